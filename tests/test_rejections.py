"""A bad item is a counted, reported rejection: never a retried-for-ever failure, never the end of a stream.

A prompt past the model's context comes back from the gateway (GenerateBatch) and from the annotator's
judges (AnnotateStream) as a per-item INVALID_ARGUMENT with the backend's message (tests/test_backend_wire.py).
The windowed client driver (moaa/client/window.py) hands such an item to its caller, which records it once
(the pipeline's `rejected.jsonl`, `moaa annotate`'s `<out>.rejected.jsonl`); a re-run does not resend it.
An item over the server's max_request_bytes is such an item too, answered by the one stream helper
(services/common/stream.py) while the stream goes on."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from moaa.client.endpoint import Endpoint
from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.pipeline.stages import StageContext, stage_pairs
from moaa.services.config import parse_config
from moaa.services.gateway.server import start_gateway
from moaa.v1 import gateway_pb2
from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as annotate_request
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.cli import run_moaa as _moaa

LONG = " ".join(["word"] * 600)  # 600+ emulator tokens: past a 300-token context
TOO_LONG = "maximum context length is 300 tokens"


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _prompts(path: Path, long_at: set[int]) -> Path:
    rows = [{"instruction": (f"{LONG} {i}" if i in long_at else f"Explain topic {i} in one sentence.")}
            for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
async def gateway(gw_emulators):
    """Three proposers that refuse, as vLLM does, a prompt past a 300-token context; an aggregator without a limit."""
    emu = await gw_emulators(profiles={p: {"max_model_len": 300} for p in ("p1", "p2", "p3")})
    gw = await start_gateway(parse_config(moa_config(emu.url, ["p1", "p2", "p3"], gateway={"http_port": None})),
                             probes=False)
    yield emu, gw
    await gw.stop(0)


def _pipeline(gw, prompts: Path, out: Path) -> list[str]:
    return ["pipeline", "run", "--quiet", "--prompts", str(prompts), "--out", str(out), "--gateway", gw.address,
            "--annotator", "127.0.0.1:9", "--target", "org/m", "--until", "sft_data", "--set", "answer_tokens=16"]


async def test_pipeline_stage1_records_a_prompt_past_the_context_as_a_rejection(gateway, tmp_path):
    emu, gw = gateway
    prompts, out = _prompts(tmp_path / "prompts.jsonl", {3}), tmp_path / "run"
    rc, stdout, err = await _moaa(*_pipeline(gw, prompts, out))
    assert rc == 0, err
    data = out / "stage1-sft-data"
    rows = [r for shard in sorted(data.glob("data-*.jsonl")) for r in _lines(shard)]
    rejected = _lines(data / "rejected.jsonl")
    assert len(rows) == 5 and len(rejected) == 1 and rejected[0]["id"] not in {r["id"] for r in rows}
    assert rejected[0]["stage"] == "sft_data" and rejected[0]["reason"].startswith("INVALID_ARGUMENT")
    assert TOO_LONG in rejected[0]["reason"] and not _lines(data / "failures.jsonl")
    line = "1 prompts rejected: INVALID_ARGUMENT"
    assert line in stdout and TOO_LONG in stdout and str(data / "rejected.jsonl") in stdout, stdout
    summary = json.loads((out / "summary.json").read_text())["sft_data"]
    assert summary["rows"] == 5 and summary["rejected"] == 1 and summary["failed"] == 0
    assert TOO_LONG in summary["rejected_reason"]
    report = (out / "report" / "report.md").read_text()
    assert f"stage 1: {line}" in report and str(data / "rejected.jsonl") in report
    assert json.loads((data / "manifest.json").read_text())["rejected"] == 1

    sent = emu.stats.requests
    rc, again, err = await _moaa(*_pipeline(gw, prompts, out))
    assert rc == 0, err
    assert emu.stats.requests == sent, "a rejected prompt is not resent"
    assert again == stdout


async def test_pipeline_stage1_where_every_prompt_is_rejected_exits_2(gateway, tmp_path):
    _, gw = gateway
    prompts, out = _prompts(tmp_path / "prompts.jsonl", set(range(6))), tmp_path / "run"
    for _ in range(2):  # the re-run sends nothing and says so again
        rc, _, err = await _moaa(*_pipeline(gw, prompts, out))
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert "all 6 rows were rejected: INVALID_ARGUMENT" in lines[0] and "rejected.jsonl" in lines[0], err
    assert len(_lines(out / "stage1-sft-data" / "rejected.jsonl")) == 6


async def test_pipeline_stage1_item_over_max_request_bytes_is_a_rejection(gw_emulators, tmp_path):
    """An item over the gateway's max_request_bytes is an item error on a stream that goes on, so the pipeline
    records it as a rejection like any other bad input."""
    emu = await gw_emulators()
    gw = await start_gateway(parse_config(moa_config(emu.url, ["p1", "p2", "p3"],
                                                     gateway={"http_port": None, "max_request_bytes": 4096})),
                             probes=False)
    try:
        prompts = _prompts(tmp_path / "prompts.jsonl", set())
        rows = prompts.read_text().splitlines()
        rows[4] = json.dumps({"instruction": "z" * 6000})
        prompts.write_text("\n".join(rows) + "\n")
        rc, stdout, err = await _moaa(*_pipeline(gw, prompts, tmp_path / "run"))
    finally:
        await gw.stop(0)
    assert rc == 0, err
    (rej,) = _lines(tmp_path / "run" / "stage1-sft-data" / "rejected.jsonl")
    assert rej["reason"].startswith("INVALID_ARGUMENT") and "gateway.max_request_bytes" in rej["reason"], rej
    assert "1 prompts rejected" in stdout and "5 SFT rows written" in stdout, stdout


async def test_pipeline_pairs_stage_records_a_judging_prompt_past_the_context_as_a_rejection(
        judge_emulator, annotator_factory, tmp_path):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris@max_model_len=1000",
                                                                     "b": "keyword:paris@max_model_len=1000"},
                                                mode="pointwise", combine="mean"))
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": "Capital of France?"}],
             "samples": ["Paris. " + (LONG if i == 4 else "It is Paris."), "Rome."]} for i in range(6)]
    (layout.samples / "data-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", base_model="x",
                       settings={"allow_failures": 0.0}, annotator=Endpoint(stub.server.address), quiet=True)
    judge_emulator.reset()
    result = await stage_pairs(ctx)
    assert result["rows"] == 5 and result["failed"] == 0 and result["rejected"] == 1, result
    assert "maximum context length is 1000 tokens" in result["rejected_reason"]
    (rej,) = _lines(layout.pairs / "rejected.jsonl")
    assert rej["id"] == "p4" and rej["stage"] == "pairs"
    judge_emulator.reset()
    assert await stage_pairs(ctx) == result and judge_emulator.stats.requests == 0


def _samples(path: Path, long_at: set[int]) -> Path:
    rows = [{"id": f"r{i}", "prompt": [{"role": "user", "content": "Capital of France?"}],
             "candidates": [{"text": "Paris. " + (LONG if i in long_at else "It is Paris."), "model": "sft"},
                            {"text": "Rome.", "model": "sft"}]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


async def test_moaa_annotate_records_a_judging_prompt_past_the_context_as_a_rejection(judge_emulator,
                                                                                      annotator_factory, tmp_path):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris@max_model_len=1000",
                                                                     "b": "keyword:paris@max_model_len=1000"},
                                                mode="pointwise", combine="mean"))
    inp, out = _samples(tmp_path / "samples.jsonl", {2}), tmp_path / "pairs.jsonl"
    args = ("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out), "--no-progress")
    judge_emulator.reset()
    rc, _, err = await _moaa(*args)
    assert rc == 0, err
    assert sorted(r["id"] for r in _lines(out)) == ["r0", "r1", "r3", "r4", "r5"]
    (rej,) = _lines(tmp_path / "pairs.jsonl.rejected.jsonl")
    # the judges ask for 512 tokens: the long row's judging prompt (600+ tokens) leaves no room in 1000
    too_long = "maximum context length is 1000 tokens"
    assert rej["id"] == "r2" and rej["stage"] == "annotate" and too_long in rej["reason"]
    assert "5 pairs written" in err and "1 prompts rejected: INVALID_ARGUMENT" in err and too_long in err, err
    assert json.loads((tmp_path / "pairs.jsonl.report.json").read_text())["rejected"] == 1
    judge_emulator.reset()
    rc, _, err = await _moaa(*args)
    assert rc == 0 and judge_emulator.stats.requests == 0, err
    assert "0 pairs written" in err and "5 already done" in err and "1 prompts rejected" in err, err


# -- an item over max_request_bytes: a per-item INVALID_ARGUMENT, the stream goes on ----------------------

async def test_generate_batch_item_over_max_request_bytes_is_an_item_error(gw_emulators, gateway_factory):
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"max_request_bytes": 4096}))

    async def items():
        for i in range(4):
            yield gateway_pb2.BatchItem(id=f"i{i}", request=request("x" * 6000 if i == 1 else f"question {i}"))

    results = {r.id: r async for r in gw.stub.GenerateBatch(items(), timeout=30)}
    assert sorted(results) == ["i0", "i1", "i2", "i3"]
    assert all(results[i].WhichOneof("result") == "response" for i in ("i0", "i2", "i3"))
    bad = results["i1"].error
    assert bad.code == "INVALID_ARGUMENT", bad
    assert "bytes" in bad.message and "4096" in bad.message and "gateway.max_request_bytes" in bad.message, bad
    # a unary call over the limit keeps its status (proto/moaa/v1/gateway.proto)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request("x" * 6000), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "gateway.max_request_bytes" in err.value.details()


async def test_annotate_stream_item_over_max_request_bytes_is_an_item_error(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise",
                                                combine="mean", annotator={"max_request_bytes": 4096}))

    async def items():
        for i in range(4):
            yield annotate_request(["Paris.", "y" * 6000 if i == 2 else "Rome."], id=f"r{i}")

    results = {r.id: r async for r in stub.AnnotateStream(items(), timeout=30)}
    assert sorted(results) == ["r0", "r1", "r2", "r3"]
    assert all(results[i].WhichOneof("result") == "response" for i in ("r0", "r1", "r3"))
    bad = results["r2"].error
    assert bad.code == "INVALID_ARGUMENT" and "annotator.max_request_bytes" in bad.message, bad


async def test_moaa_annotate_where_every_row_is_rejected_exits_2(judge_emulator, annotator_factory, tmp_path):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris@max_model_len=1000"},
                                                mode="pointwise", combine="mean"))
    inp, out = _samples(tmp_path / "samples.jsonl", set(range(6))), tmp_path / "pairs.jsonl"
    for _ in range(2):  # the re-run sends nothing and says so again
        rc, _, err = await _moaa("annotate", "--annotator", stub.server.address, "--in", str(inp), "--out", str(out),
                                 "--no-progress")
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert "every row was rejected" in lines[0] and "6 prompts rejected: INVALID_ARGUMENT" in lines[0], err
        assert "delete that file to resend them" in lines[0]
