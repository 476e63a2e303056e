"""Stage 2 judging against a real annotator over the judge emulator: samples in, TRL preference rows out,
skips recorded with reasons, resumable by prompt id."""
import json

from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.pipeline.rpc import Endpoint
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
        ctx = StageContext(layout=layout, ledger=ledger, config_hash="h", train_prompts=[], eval_prompts=[],
                           base_model="x", settings={"allow_failures": 0.1}, annotator=Endpoint(server.address),
                           quiet=True)
        result = await stage_pairs(ctx)
        assert result["rows"] == 2 and result["skipped"] == 1
        assert result["skipped_reasons"] == {"too_few_candidates": 1}
        rows = {r["id"]: r for r in DatasetStore(layout.pairs, stage="pairs", fmt="preference").open().iter_rows()}
        p0 = rows["p0"]
        assert p0["chosen"] == [{"role": "assistant", "content": "Red is a warm colour often used for warnings."}]
        assert p0["rejected"][0]["content"] in ("Blue.", "Green")
        assert p0["candidates"] == ["s0", "s1", "s2"]           # empty and duplicate answers were not sent
        assert set(p0["judge_scores"]) == {"j1", "j2"} and len(p0["judge_scores"]["j1"]) == 3
        assert rows["p2"]["chosen"][0]["content"].startswith("one, two")
        train = [json.loads(x) for x in (layout.pairs / "train.jsonl").read_text().splitlines()]
        assert {tuple(sorted(r)) for r in train} == {("chosen", "id", "prompt", "rejected")}
        assert ledger.stage_total("pairs") > 0
        # resumable: nothing is judged again
        before = judge_emulator.stats.requests
        assert (await stage_pairs(ctx))["rows"] == 2
        assert judge_emulator.stats.requests == before
    finally:
        await server.stop(0)
