"""Stage 2 judging against a real annotator over the judge emulator: samples in, TRL preference rows out,
skips recorded with reasons, resumable by prompt id."""
import json

from moaa.client.pairs import judge_scores
from moaa.jsonl import read_rows
from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.client.endpoint import Endpoint
from moaa.pipeline.stages import StageContext, stage_pairs
from moaa.pipeline.store import DatasetStore
from moaa.services.annotator.server import start_annotator
from moaa.services.config import parse_config
from tests.fixtures.annotator import judge_config


def _samples(layout: RunLayout):
    rows = [
        {"id": "p0", "prompt": [{"role": "user", "content": "Name a colour."}],
         "samples": ["Blue.", "Red is a warm colour often used for warnings.", "Green", "", "Blue."]},
        {"id": "p1", "prompt": [{"role": "user", "content": "Say hi."}], "samples": ["hi", "", "hi", "  "]},
        {"id": "p2", "prompt": [{"role": "user", "content": "Count to three."}],
         "samples": [{"text": "1 2 3"}, {"text": "one, two, three, and that is all"}]},
    ]
    layout.samples.mkdir(parents=True)
    (layout.samples / "data-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


async def test_stage_pairs_with_real_annotator(judge_emulator, tmp_path):
    cfg = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest+text"}, mode="pointwise",
                       combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    try:
        layout = RunLayout(tmp_path)
        _samples(layout)
        ledger = TokenLedger(layout.usage)
        ctx = StageContext(layout=layout, ledger=ledger, config_hash="h", base_model="x",
                           settings={"allow_failures": 0.1}, annotator=Endpoint(server.address),
                           quiet=True)
        result = await stage_pairs(ctx)
        assert result["rows"] == 2 and result["skipped"] == 1
        assert result["skipped_reasons"] == {"too_few_candidates": 1}
        rows = {r["id"]: r for r in DatasetStore(layout.pairs, stage="pairs", fmt="preference").open().iter_rows()}
        p0 = rows["p0"]
        assert p0["chosen"] == [{"role": "assistant", "content": "Red is a warm colour often used for warnings."}]
        assert p0["rejected"][0]["content"] in ("Blue.", "Green")
        ann = p0["annotation"]
        assert ann["candidates"] == ["s0", "s1", "s2"]           # empty and duplicate answers were not sent
        assert {j["judge"] for j in ann["judges"]} == {"j1", "j2"} and len(ann["judges"][0]["scores"]) == 3
        assert judge_scores(p0)["j1"] == [j["scores"][c] for j in ann["judges"] if j["judge"] == "j1"
                                          for c in ann["candidates"]]
        assert rows["p2"]["chosen"][0]["content"].startswith("one, two")
        train = [json.loads(x) for x in (layout.pairs / "train.jsonl").read_text().splitlines()]
        assert {tuple(sorted(r)) for r in train} == {("chosen", "id", "prompt", "rejected")}
        assert ledger.stage_total("pairs") > 0
        # the ledger equals the tokens journaled with the rows (pairs and judged skips)
        journaled = DatasetStore(layout.pairs, stage="pairs", fmt="preference").open().usage
        assert sum(u["prompt_tokens"] + u["completion_tokens"] for u in journaled.values()) == \
            ledger.stage_total("pairs")
        # resumable: nothing is judged again
        before = judge_emulator.stats.requests
        assert (await stage_pairs(ctx))["rows"] == 2
        assert judge_emulator.stats.requests == before
    finally:
        await server.stop(0)


async def test_moaa_annotate_and_pairs_stage_write_one_schema(judge_emulator, tmp_path):
    """The same samples through `moaa annotate` (a real subprocess) and through the pipeline's pairs stage,
    against one real annotator: both outputs are read by one reader and hold the same rows."""
    from moaa.client.pairs import PAIR_KEYS, read_pairs
    from moaa.trainer.data import load_rows
    from tests.test_annotator_cli import moaa

    cfg = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest+text"}, mode="pointwise",
                       combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    try:
        layout = RunLayout(tmp_path / "run")
        _samples(layout)
        ctx = StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", base_model="x",
                           settings={"allow_failures": 0.1},
                           annotator=Endpoint(server.address), quiet=True)
        await stage_pairs(ctx)
        out = tmp_path / "pairs.jsonl"
        rc, _, err = await moaa("annotate", "--annotator", server.address, "--in",
                                str(layout.samples / "data-00000.jsonl"), "--out", str(out), "--no-progress")
        assert rc == 0, err
    finally:
        await server.stop(0)
    from_cli = {r["id"]: r for r in read_pairs(out)}
    from_pipeline = {r["id"]: r for r in read_pairs(layout.pairs / "data-00000.jsonl")}
    assert set(from_cli) == set(from_pipeline) == {"p0", "p2"}
    for rid in from_cli:
        a, b = from_cli[rid], from_pipeline[rid]
        assert set(a) == set(b) == set(PAIR_KEYS)
        assert set(a["annotation"]) == set(b["annotation"])
        for key in ("prompt", "chosen", "rejected"):
            assert a[key] == b[key]
        assert a["annotation"]["candidates"] == b["annotation"]["candidates"]
        assert judge_scores(a) == judge_scores(b)
    # and DPO training reads both
    assert len(load_rows(out, "preference")[0]) == len(load_rows(layout.pairs / "data-00000.jsonl", "preference")[0]) == 2
    # the skips carry the same record too
    skipped = [json.loads(x) for x in (tmp_path / "pairs.jsonl.skipped.jsonl").read_text().splitlines()]
    stage_skips = [json.loads(x) for x in (layout.pairs / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == [s["id"] for s in stage_skips] == ["p1"]
    assert skipped[0]["reason"] == stage_skips[0]["reason"]


async def test_sigkill_during_pairs_then_resume_ledger_equals_rows(judge_emulator, tmp_path):
    """A pairs stage in a real process is SIGKILLed mid-stream; the resumed stage writes every id exactly once
    and the token ledger equals the tokens journaled with the rows (nothing spent on disk is forgotten)."""
    import asyncio
    import os
    import signal
    import sys
    import textwrap

    cfg = judge_config(judge_emulator.url, {"j1": "longest+delay=0.05", "j2": "longest+text+delay=0.05"},
                       mode="pointwise", combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    n = 40
    (layout.samples / "data-00000.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
                    "candidates": [{"text": "short"}, {"text": f"a longer answer number {i}"}]}) + "\n"
        for i in range(n)))
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from moaa.client.endpoint import Endpoint
        from moaa.pipeline.budget import TokenLedger
        from moaa.pipeline.layout import RunLayout
        from moaa.pipeline.stages import StageContext, stage_pairs
        layout = RunLayout(Path({str(tmp_path)!r}))
        ctx = StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", base_model="x",
                           settings={{"allow_failures": 0.1, "window": 2}},
                           annotator=Endpoint({server.address!r}), quiet=True)
        asyncio.run(stage_pairs(ctx))
    """)
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script)
        shard = layout.pairs / "data-00000.jsonl"
        for _ in range(600):
            await asyncio.sleep(0.05)
            if shard.exists() and shard.read_text().count("\n") >= 5:
                break
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        written = shard.read_text().count("\n")
        assert 5 <= written < n, "the stage was not killed mid-stream"
        assert not layout.usage.exists() or TokenLedger(layout.usage).stage_total("pairs") == 0  # never saved
        ledger = TokenLedger(layout.usage)
        ctx = StageContext(layout=layout, ledger=ledger, config_hash="h", base_model="x",
                           settings={"allow_failures": 0.1}, annotator=Endpoint(server.address),
                           quiet=True)
        result = await stage_pairs(ctx)
    finally:
        await server.stop(0)
    store = DatasetStore(layout.pairs, stage="pairs", fmt="preference").open()
    skipped = layout.pairs / "skipped.jsonl"
    ids = [r["id"] for r in store.iter_rows()] + [r["id"] for r in read_rows(skipped)] * skipped.exists()
    assert sorted(ids) == sorted(f"p{i}" for i in range(n)) and result["rows"] + result["skipped"] == n
    journaled = sum(u["prompt_tokens"] + u["completion_tokens"] for u in store.usage.values())
    assert journaled > 0 and TokenLedger(layout.usage).stage_total("pairs") == journaled


async def test_budget_stop_overspends_by_at_most_the_rows_in_flight(judge_emulator, tmp_path):
    import pytest

    from moaa.pipeline.budget import BudgetExhausted

    cfg = judge_config(judge_emulator.url, {"j1": "longest"}, mode="pointwise", combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    (layout.samples / "data-00000.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "prompt": [{"role": "user", "content": f"Question {i}?"}],
                    "candidates": [{"text": "short"}, {"text": f"a longer answer number {i}"}]}) + "\n"
        for i in range(30)))
    window, budget = 3, 500
    ledger = TokenLedger(layout.usage, budget=budget)
    ctx = StageContext(layout=layout, ledger=ledger, config_hash="h", base_model="x",
                       settings={"allow_failures": 0.1, "window": window},
                       annotator=Endpoint(server.address), quiet=True)
    try:
        with pytest.raises(BudgetExhausted):
            await stage_pairs(ctx)
    finally:
        await server.stop(0)
    rows = list(DatasetStore(layout.pairs, stage="pairs", fmt="preference").open().iter_rows())
    cost = [sum(u["prompt_tokens"] + u["completion_tokens"] for u in r["usage"].values()) for r in rows]
    assert 0 < len(rows) < 30 and ledger.total == sum(cost)
    assert ledger.total - budget <= window * max(cost)


def test_answers_are_read_from_the_field_that_was_checked():
    """One rule picks a samples row's answers field and an answer's text, for checking and for reading: a
    row with two answer fields is read from the one that was checked, and "text" wins over "content"."""
    from moaa.client.pairs import annotate_request, malformed_items, sample_items
    two = {"id": "r", "prompt": "hi", "candidates": [], "samples": ["a", "b"]}
    assert malformed_items(two) is None and sample_items(two) == []
    assert annotate_request(two)[1].startswith("too_few_candidates: 0")
    both = {"id": "r", "prompt": "hi", "candidates": [{"text": "", "content": "x"}, {"content": "y"}]}
    assert malformed_items(both) is None and [c["text"] for c in sample_items(both)] == ["", "y"]
    bad = {"id": "r", "prompt": "hi", "candidates": [{"text": None, "content": "x"}, "b"]}
    assert malformed_items(bad) == 'candidates[0] is no answer: give a string or {"text": ...}'
