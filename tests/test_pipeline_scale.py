"""What `benchmarks/pipeline_scale.py` exposed at 65,000 rows, held as tests: the dataset stages read
their input as they send it (rows in flight, not the whole file), the store and the JSONL reader go
line by line, and a bad input row mid-stream stops cleanly with its error after the rows in flight."""
import json

import pytest

from moaa.client.endpoint import Endpoint
from moaa.errors import UserError
from moaa.jsonl import iter_scan
from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.progress import StageProgress
from moaa.pipeline.rpc import annotate_stream
from moaa.pipeline.stages import StageContext, stage_pairs
from moaa.files import atomic_write_text
from moaa.pipeline.store import DatasetStore
from moaa.services.annotator.server import start_annotator
from moaa.services.config import parse_config
from tests.fixtures.annotator import judge_config


def _row(i: int) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
            "samples": [f"short {i}", f"a longer answer to question {i}"]}


@pytest.fixture
async def annotator(judge_emulator):
    cfg = judge_config(judge_emulator.url, {"j1": "longest"}, mode="pointwise", combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    yield Endpoint(server.address)
    await server.stop(0)


async def test_judging_reads_samples_as_it_sends_them(annotator, tmp_path):
    """Read-ahead is bounded by the window: the old stage read every sample row and built every request
    before the first call (65,000 rows of 5 candidates held in memory)."""
    store = DatasetStore(tmp_path / "pairs", stage="pairs", fmt="preference").open()
    window, ahead = 4, []

    def rows():
        for i in range(60):
            ahead.append(i - store.rows)  # rows taken from the input minus rows written
            yield _row(i)

    progress = StageProgress("t", 60, 0, quiet=True)
    await annotate_stream(annotator, rows(), store, TokenLedger(), progress, window=window)
    assert store.rows == 60
    assert max(ahead) <= window + 1        # the window in flight plus the one row read ahead


async def test_bad_sample_row_mid_stream_writes_rows_in_flight_then_fails(annotator, tmp_path):
    store = DatasetStore(tmp_path / "pairs", stage="pairs", fmt="preference").open()
    rows = [_row(0), _row(1), {"id": "broken", "samples": ["a", "b"]}, _row(3)]
    with pytest.raises(UserError, match="row 'broken': .*give 'prompt'"):
        await annotate_stream(annotator, iter(rows), store, TokenLedger(), StageProgress("t", 4, 0, quiet=True))
    assert sorted(r["id"] for r in store.iter_rows()) == ["p0", "p1"]    # written, not lost with the call


async def test_stage_pairs_over_a_one_shard_samples_file_resumes(annotator, tmp_path):
    """The samples folder is one 300-row shard (as `moaa sample` writes it); a second run judges nothing."""
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    atomic_write_text(layout.samples / "data-00000.jsonl", (json.dumps(_row(i)) + "\n" for i in range(300)))
    ctx = StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", base_model="x",
                       settings={"allow_failures": 0.1, "window": 16},
                       annotator=annotator, quiet=True)
    assert (await stage_pairs(ctx))["rows"] == 300
    ids = [r["id"] for r in DatasetStore(layout.pairs, stage="pairs", fmt="preference").open().iter_rows()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(300))
    assert (await stage_pairs(ctx))["rows"] == 300
    train = (layout.pairs / "train.jsonl").read_text().splitlines()
    held = (layout.pairs / "heldout.jsonl").read_text().splitlines()   # pairs held out to measure DPO on
    assert len(train) + len(held) == 300 and len(held) == 60


def test_scan_streams_rows_before_a_bad_line(tmp_path):
    """Rows come one at a time (a shard is never read whole), so a bad line is met after the good ones."""
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\nnot json\n')
    it = iter_scan(path)
    assert [next(it)[1]["id"], next(it)[1]["id"]] == ["a", "b"]
    with pytest.raises(UserError, match=r"rows.jsonl:3: not JSON"):
        next(it)


def test_store_reopen_after_torn_tail_across_shards(tmp_path):
    """Resume state from a streamed open: ids, row counts and the last shard's fill, the torn row cut."""
    store = DatasetStore(tmp_path, stage="s", fmt="sft", shard_rows=3).open()
    for i in range(7):
        store.write({"id": f"r{i}", "messages": [], "usage": {"m": {"prompt_tokens": 1, "completion_tokens": 2}}})
    store.skip("r9", "why")
    with (tmp_path / "data-00002.jsonl").open("a") as fh:
        fh.write('{"id": "r7", "mess')                 # killed mid-write
    again = DatasetStore(tmp_path, stage="s", fmt="sft", shard_rows=3).open()
    assert again.rows == 7 == len(again.done) and all(f"r{i}" in again.done for i in range(7))
    assert "r9" in again.skipped and len(again.skipped) == 1 and again.skip_reasons == {"why": 1}
    assert again.usage["m"]["prompt_tokens"] == 7 and again.usage["m"]["completion_tokens"] == 14
    assert (tmp_path / "data-00002.jsonl").read_text().endswith("}\n")
    assert again.write({"id": "r7", "messages": []})
    assert again.write({"id": "r8", "messages": []})  # shard 2 held 1 row + r7 -> r8 fills it to 3
    assert [p.name for p in again.shards()] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    assert again.write({"id": "r10", "messages": []}) and len(again.shards()) == 4


def test_group_commit_writes_every_row_and_syncs_before_the_manifest(tmp_path, monkeypatch):
    """One fsync per interval, not per row; every row is in the file at once; the manifest syncs first."""
    import os

    from moaa.jsonl import JsonlAppender, read_rows

    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    w = JsonlAppender(tmp_path / "a.jsonl", sync_every_s=3600)
    w.open()
    for i in range(50):
        w.append({"id": f"r{i}"})
    assert calls == [] and len(list(read_rows(tmp_path / "a.jsonl"))) == 50   # written, not yet synced
    w.sync()
    assert len(calls) == 1
    w.sync()
    assert len(calls) == 1                                            # nothing left to sync
    per_row = JsonlAppender(tmp_path / "b.jsonl")                     # the default: fsync per row
    per_row.append({"id": "x"})
    per_row.append({"id": "y"})
    assert len(calls) == 3
    monkeypatch.setattr("moaa.pipeline.store.SYNC_EVERY_S", 3600)
    store = DatasetStore(tmp_path / "ds", stage="s", fmt="sft").open()
    n = len(calls)
    for i in range(20):
        store.write({"id": f"r{i}", "messages": []})
    store.skip("s1", "why")
    assert len(calls) == n
    store.write_manifest()
    assert len(calls) == n + 2 + 1          # the shard, skipped.jsonl, then the manifest's own fsync


def test_idset_membership_without_keeping_the_ids():
    from moaa.idset import MERGE_AT, IdSet, _digest

    # an id whose digest ends in a NUL byte: numpy hands such an S16 element out shortened
    nul = next(str(k) for k in range(100000) if _digest(str(k))[-1] == 0)
    ids = [nul] + [f"r{i}" for i in range(2 * MERGE_AT + 5)]
    s = IdSet(ids)
    s.add("r1")                                        # again: not counted twice
    assert len(s) == len(ids) and all(i in s for i in ids) and nul in s
    assert "r-1" not in s and 7 not in s and "" not in s
    assert s._sorted.nbytes == 16 * 2 * MERGE_AT       # merged in batches, 16 bytes an id


def test_run_prompts_are_streamed_from_the_run_folder_with_the_old_split_quick_pick_and_hash(tmp_path):
    """The prompt set on disk gives exactly what the in-memory rules gave: ids, eval split, --quick pick
    and config hash (a folder started before keeps its config)."""
    import hashlib

    from moaa.prompts import PromptStream, held_out_ids
    from moaa.pipeline.promptset import QUICK_PROMPTS, config_hash, prepare_prompts

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(50)))
    rows = list(PromptStream(src))
    got = prepare_prompts(tmp_path / "prompts.jsonl", PromptStream(src), eval_fraction=0.2, quick=False)
    held = held_out_ids([r.id for r in rows], 0.2, "eval")
    assert [r.id for r in got.rows()] == [r.id for r in rows] and got.count == 50 and got.n_eval == len(held) == 10
    assert [r.id for r in got.rows("eval")] == [r.id for r in rows if r.id in held]
    assert [r.messages for r in got.rows("train")] == [r.messages for r in rows if r.id not in held]
    doc = {"settings": {"a": 1}, "target": "t", "seed": 0}
    old = hashlib.sha256(json.dumps({**doc, "prompts": [r.id for r in rows]}, sort_keys=True).encode()).hexdigest()
    assert config_hash(doc, (r.id for r in got.rows())) == old[:16]
    assert config_hash(doc, []) == hashlib.sha256(json.dumps({**doc, "prompts": []}, sort_keys=True).encode()).hexdigest()[:16]

    quick = prepare_prompts(tmp_path / "q.jsonl", PromptStream(src), eval_fraction=0.2, quick=True)
    step = len(rows) / QUICK_PROMPTS
    assert [r.id for r in quick.rows()] == [rows[int(i * step)].id for i in range(QUICK_PROMPTS)]


def test_bad_prompt_input_leaves_no_prompt_file_and_names_the_first_line_of_a_duplicate(tmp_path):
    from moaa.prompts import PromptStream
    from moaa.pipeline.promptset import prepare_prompts

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["a?", "b?", "a?", "c?", "a?"]) + "{oops\n")
    with pytest.raises(UserError, match=r"3 invalid row\(s\): line 3: duplicate id \w+ \(same as line 1\); "
                                        r"line 5: duplicate id \w+ \(same as line 1\); line 6: not valid JSON"):
        prepare_prompts(tmp_path / "prompts.jsonl", PromptStream(src), eval_fraction=0.2, quick=False)
    assert list(tmp_path.iterdir()) == [src]          # neither the file nor its temporary
    ok = prepare_prompts(tmp_path / "prompts.jsonl", PromptStream(src, skip_invalid=True), eval_fraction=0.2,
                         quick=False)
    assert ok.count == 3 and ok.invalid == 3 and ok.summary.startswith("skipped 3 invalid row(s): line 3 (dup")
    assert PromptStream(src, limit=2, skip_invalid=True).__iter__().__next__().messages[0]["content"] == "a?"
    assert len(list(PromptStream(src, limit=2))) == 2   # stops at the limit: rows after it are not read
