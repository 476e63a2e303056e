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
from moaa.pipeline.progress import StageProgress
from moaa.pipeline.rpc import annotate_stream
from moaa.pipeline.stages import StageContext, stage_pairs
from moaa.pipeline.store import DatasetStore, atomic_write_text
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
    with pytest.raises(UserError, match="'broken' needs 'prompt'"):
        await annotate_stream(annotator, iter(rows), store, TokenLedger(), StageProgress("t", 4, 0, quiet=True))
    assert sorted(r["id"] for r in store.iter_rows()) == ["p0", "p1"]    # written, not lost with the call


async def test_stage_pairs_over_a_one_shard_samples_file_resumes(annotator, tmp_path):
    """The samples folder is one 300-row shard (as `moaa sample` writes it); a second run judges nothing."""
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    atomic_write_text(layout.samples / "data-00000.jsonl", (json.dumps(_row(i)) + "\n" for i in range(300)))
    ctx = StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", train_prompts=[],
                       eval_prompts=[], base_model="x", settings={"allow_failures": 0.1, "window": 16},
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
    assert again.rows == 7 and again.done == {f"r{i}" for i in range(7)} and again.skipped == {"r9": "why"}
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
