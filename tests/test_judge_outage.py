"""Acceptance "Judge outage": one judge backend refuses connections for a window during stage 2 and then
recovers. After the run and at most one re-run every prompt has a pair or a quality skip; none is lost to
the outage. For the pipeline's pairs stage, `moaa annotate` and `moaa eval` (real annotator server, real
CLI subprocesses, emulated judges: the faulty judge's emulator is stopped and restarted on its port)."""
import asyncio
import contextlib
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moaa.errors import TransientError, UserError
from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.pipeline.rpc import Endpoint
from moaa.pipeline.stages import StageContext, stage_pairs
from moaa.jsonl import read_rows as iter_jsonl
from moaa.pipeline.store import DatasetStore
from moaa.services.annotator.server import SERVICE_NAME, start_annotator
from moaa.services.config import parse_config
from moaa.services.emulator import Emulator, EmulatorSettings
from tests.fixtures.annotator import judge_config
from tests.fixtures.cli import run_moaa as _moaa

QUALITY = ("too_many_abstentions", "too_few_scored", "low_agreement", "low_margin", "too_few_candidates")
POLICY = "longest+delay=0.2"


class FlakyJudge:
    """A judge emulator that goes down and comes back on its port. Down is `refuse` (connection refused,
    requests in flight cut) or `503` (the main emulator takes the port and answers every request 503)."""

    def __init__(self, fault: str = "refuse"):
        self.fault = fault
        self.emu: Emulator | None = None
        self.faulty: Emulator | None = None
        self.port = 0

    async def up(self) -> "FlakyJudge":
        if self.faulty is not None:
            await self.faulty.stop()
            self.faulty = None
        self.emu = Emulator(EmulatorSettings(judge=True))
        await self.emu.start("127.0.0.1", self.port)
        self.port = self.emu.port
        return self

    async def back(self) -> None:
        """The window ends: the judge answers on its port again, and the annotator's health probe has seen it
        (the probe settles the circuit breaker, as in a cluster)."""
        await self.up()
        while self.served() + self.emu.stats.probes < 1:  # a health probe (counted apart) or a request
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)

    async def down(self) -> None:
        await self.emu.stop()
        if self.fault == "503":
            self.faulty = Emulator(EmulatorSettings(error_rates={503: 1.0}))
            await self.faulty.start("127.0.0.1", self.port)

    async def close(self) -> None:
        await self.emu.stop()
        if self.faulty is not None:
            await self.faulty.stop()

    def served(self) -> int:
        return self.emu.stats.requests

    async def down_after(self, requests: int) -> None:
        """The outage starts in the middle of the work: after this many requests reached the judge."""
        while self.served() < requests:
            await asyncio.sleep(0.02)
        await self.down()


def _config(steady_url: str, flaky: FlakyJudge, **annotator) -> dict:
    cfg = judge_config(steady_url, {"j1": POLICY, "j2": POLICY}, mode="pointwise", combine="mean", min_margin=0.0,
                       annotator={"batch_window": 2, **annotator})
    cfg["backends"]["m-j2"].update(urls=[f"http://127.0.0.1:{flaky.port}/v1"],
                                   timeouts={"connect_s": 1}, circuit={"reset_after_s": 0.1},
                                   health={"probe_interval_s": 0.2, "probe_timeout_s": 1})
    return cfg


def _question(i: int) -> str:
    return f"Question number {i}?"


async def _annotator(cfg: dict):
    return await start_annotator(parse_config(cfg), port=0, probes=True)


@contextlib.asynccontextmanager
async def _ensemble(steady_url: str, fault: str = "refuse"):
    """A flaky judge, and a real annotator whose ensemble is a steady judge plus the flaky one."""
    flaky = await FlakyJudge(fault).up()
    server = await _annotator(_config(steady_url, flaky))
    try:
        yield flaky, server
    finally:
        await server.stop(0)
        await flaky.close()


async def _cli_across_outage(flaky: FlakyJudge, *args: str) -> str:
    """The command while the judge goes down mid-run (exit 75: retry), then its one re-run after the
    judge is back (exit 0). Returns the first run's stderr."""
    outage = asyncio.create_task(flaky.down_after(4))
    rc, _, err = await _moaa(*args)
    try:
        await asyncio.wait_for(outage, 30)  # the judge went down mid-run (or the command ended before it could)
    except asyncio.TimeoutError:
        raise AssertionError(f"the command ended (rc {rc}) before the outage began: {err}") from None
    assert rc == 75, err
    await flaky.back()
    rc, _, err2 = await _moaa(*args)
    assert rc == 0, err2
    return err


def _pairs_context(tmp_path, server, rows: list[dict], allow_failures: float) -> tuple[RunLayout, StageContext]:
    """Stage 2's samples written as `moaa sample` leaves them, and a stage context on the annotator."""
    layout = RunLayout(tmp_path)
    layout.samples.mkdir(parents=True)
    (layout.samples / "data-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return layout, StageContext(layout=layout, ledger=TokenLedger(layout.usage), config_hash="h", base_model="x",
                                settings={"allow_failures": allow_failures},
                                annotator=Endpoint(server.address), quiet=True)


@pytest.mark.parametrize("fault", ["refuse", "503"])
async def test_pipeline_pairs_stage_loses_no_prompt_to_a_judge_outage(judge_emulator, tmp_path, fault):
    async with _ensemble(judge_emulator.url, fault) as (flaky, server):
        rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": _question(i)}],
                 "samples": ["short", "a much longer answer " * (i % 3 + 1)]} for i in range(12)]
        rows.append({"id": "tie", "prompt": [{"role": "user", "content": "Tie?"}], "samples": ["aaaa", "bbbb"]})
        layout, ctx = _pairs_context(tmp_path, server, rows, 0.1)
        outage = asyncio.create_task(flaky.down_after(4))
        runs = 0
        for _ in range(2):  # the run and at most one re-run
            runs += 1
            try:
                result = await stage_pairs(ctx)
                break
            except TransientError as err:  # too many failures: the stage stays incomplete, rows pending
                assert "re-run the same command to retry them" in str(err)
                await outage
                await flaky.back()
        failures = list(iter_jsonl(layout.pairs / "failures.jsonl"))
        assert failures and all(f["error"].startswith("UNAVAILABLE: judge backends failed: j2 (m-j2:")
                                for f in failures)
        assert any({"refuse": "m-j2: connect", "503": "m-j2: http_5xx"}[fault] in f["error"] for f in failures)
        store = DatasetStore(layout.pairs, stage="pairs", fmt="preference").open()
        skips = {r["id"]: r["reason"] for r in iter_jsonl(layout.pairs / "skipped.jsonl")}
        assert {r["id"] for r in store.iter_rows()} | set(skips) == {r["id"] for r in rows}, "a pair or a skip"
        assert all(why.split(":")[0] in QUALITY for why in skips.values()), skips
        assert list(skips) == ["tie"] and skips["tie"].startswith("low_margin") and len(store.skipped) == 1
        assert not store.failed and result["rows"] == 12 and result["failed"] == 0 and runs <= 2
        assert result["skipped_reasons"] == {"low_margin": 1}


async def test_pipeline_pairs_stage_keeps_few_failures_as_failures_and_retries_them(judge_emulator, tmp_path):
    """Under allow_failures the stage may complete, but the failed prompts are failures (not skips) and the
    next run of the stage retries them."""
    async with _ensemble(judge_emulator.url) as (flaky, server):
        await flaky.down()
        rows = [{"id": f"p{i}", "prompt": [{"role": "user", "content": _question(i)}],
                 "samples": ["short", "a much longer answer"]} for i in range(3)]
        layout, ctx = _pairs_context(tmp_path, server, rows, 1.0)
        with pytest.raises(UserError, match="no preference pairs"):
            await stage_pairs(ctx)
        store = DatasetStore(layout.pairs, stage="pairs", fmt="preference").open()
        assert set(store.failed) == {"p0", "p1", "p2"} and not store.skipped and not store.done
        assert json.loads((layout.pairs / "manifest.json").read_text())["failed"] == 3
        await flaky.back()
        result = await stage_pairs(ctx)
        assert result["rows"] == 3 and result["failed"] == 0 and result["skipped"] == 0


async def test_moaa_annotate_loses_no_prompt_to_a_judge_outage(judge_emulator, tmp_path):
    async with _ensemble(judge_emulator.url) as (flaky, server):
        inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
        ids = [f"r{i}" for i in range(12)]
        inp.write_text("".join(json.dumps({"id": i, "prompt": [{"role": "user", "content": f"Q {i}?"}],
                                           "candidates": [{"text": "short"}, {"text": "a much longer answer"}]}) + "\n"
                               for i in ids))
        err = await _cli_across_outage(flaky, "annotate", "--annotator", server.address, "--in", str(inp),
                                       "--out", str(out), "--no-progress")
        assert "rerun to retry them" in err
        done = [r["id"] for r in iter_jsonl(out)]
        assert sorted(done) == sorted(ids) and len(done) == len(set(done))
        assert not list(iter_jsonl(tmp_path / "pairs.jsonl.skipped.jsonl"))
        report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
        assert report["pairs"] + report["already_done"] == 12 and report["skipped"] == report["errors"] == 0


async def test_moaa_annotate_reports_outage_rows_as_errors_not_skips(judge_emulator, tmp_path):
    async with _ensemble(judge_emulator.url) as (flaky, server):
        await flaky.down()
        inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
        inp.write_text(json.dumps({"id": "r0", "prompt": "Q?", "candidates": [{"text": "a"}, {"text": "bb"}]}) + "\n")
        rc, _, err = await _moaa("annotate", "--annotator", server.address, "--in", str(inp), "--out", str(out),
                                 "--no-progress")
        assert rc == 75 and "1 rows failed" in err, err
        errors = list(iter_jsonl(tmp_path / "pairs.jsonl.errors.jsonl"))
        assert [e["id"] for e in errors] == ["r0"]
        assert errors[0]["error"].startswith("UNAVAILABLE: judge backends failed: j2 (m-j2:")
        report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
        assert report["errors"] == 1 and report["skipped"] == 0 and report["skip_reasons"] == {}


async def test_moaa_annotate_marks_rows_decided_without_a_failed_judge(judge_emulator, tmp_path):
    """min_judges 1 of 2 and j2's backend down: the rows are decided by j1 alone, and each says so (its
    annotation's failures and note), as do the last line and the report; none looks like a one-judge row."""
    flaky = await FlakyJudge().up()
    cfg = _config(judge_emulator.url, flaky)
    cfg["ensembles"]["e"]["min_judges"] = 1
    server = await _annotator(cfg)
    try:
        await flaky.down()
        inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
        inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Q {i}?", "candidates": [
            {"text": "short"}, {"text": "a much longer answer"}]}) + "\n" for i in range(3)))
        rc, _, err = await _moaa("annotate", "--annotator", server.address, "--in", str(inp), "--out", str(out),
                                 "--no-progress")
        assert rc == 0 and "3 decided without a judge whose backend failed: m-j2" in err, err
        rows = list(iter_jsonl(out))
        assert len(rows) == 3
        for row in rows:
            ann = row["annotation"]
            assert [j["judge"] for j in ann["judges"]] == ["j1"] and ann["note"].startswith("decided by 1 of 2 judges")
            assert ann["failures"] and {f["model"] for f in ann["failures"]} == {"m-j2"}, ann["failures"]
            assert all(f["cause"] in ("connect", "circuit_open") and f["message"] for f in ann["failures"])
        report = json.loads((tmp_path / "pairs.jsonl.report.json").read_text())
        assert report["fewer_judges"] == 3 and report["judge_failures"] == {"m-j2": 3}
    finally:
        await server.stop(0)
        await flaky.close()


async def test_moaa_eval_loses_no_judgment_to_a_judge_outage(judge_emulator, tmp_path):
    async with _ensemble(judge_emulator.url) as (flaky, server):
        a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        a.write_text("".join(json.dumps({"id": f"q{i}", "prompt": _question(i), "answer": "long answer " * 8}) + "\n"
                             for i in range(10)))
        b.write_text("".join(json.dumps({"id": f"q{i}", "prompt": _question(i), "answer": "short"}) + "\n"
                             for i in range(10)))
        err = await _cli_across_outage(flaky, "eval", "--answers", str(a), "--baseline", str(b), "--annotator",
                                       server.address, "--out", str(tmp_path / "ev"), "--bootstrap", "100")
        assert "judgments failed" in err and "UNAVAILABLE: judge backends failed: j2" in err
        wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
        assert wr["n"] == 10 and wr["win_rate"] == 100.0            # every judgment is there, none abstained
        assert not list(iter_jsonl(tmp_path / "ev" / "judgments" / "skipped.jsonl"))

async def _health(address: str, service: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                                timeout=5)).status


async def _wait_health(address: str, status: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while await _health(address, SERVICE_NAME) != status:
        assert loop.time() < end, f"health of {SERVICE_NAME} never became {status}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("fault", ["refuse", "503"])
async def test_annotator_health_reports_a_judge_outage_and_the_recovery(judge_emulator, tmp_path, fault):
    async with _ensemble(judge_emulator.url, fault) as (flaky, server):
        assert await _health(server.address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        await flaky.down()
        await _wait_health(server.address, health_pb2.HealthCheckResponse.NOT_SERVING)
        # the process itself is fine: the overall status, which kubelet probes, stays SERVING
        assert await _health(server.address, "") == health_pb2.HealthCheckResponse.SERVING
        await flaky.back()
        await _wait_health(server.address, health_pb2.HealthCheckResponse.SERVING)


def test_run_summary_lists_failures_apart_from_quality_skips():
    from moaa.pipeline.runner import format_summary

    text = format_summary({"run_folder": "run", "pairs": {"rows": 2, "skipped": 1, "skipped_reasons": {"low_margin": 1},
                                                          "failed": 2}})
    assert "2 preference pairs, 1 prompts skipped (low_margin 1), 2 failed (a re-run retries them)" in text
