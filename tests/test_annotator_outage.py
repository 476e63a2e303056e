"""A judge backend that fails is a failure, never an abstention: the annotator decides with the judges that
answered only when the ensemble's quorum (`min_judges`, default all) allows it, otherwise the item is
UNAVAILABLE naming the judges and causes (unary status; ErrorDetail in streams), and Prometheus counts it."""
import asyncio
import urllib.request

import grpc
import pytest

from moaa.services.config import ConfigError, parse_config
from tests.fixtures.annotator import judge_config, request

GOOD, BAD = "Paris is the capital of France.", "Bananas are yellow and rich in potassium, eat them daily."
DOWN = "http://127.0.0.1:9/v1"  # nothing listens on the discard port: connection refused


def _with_down_judge(url: str, **ensemble) -> dict:
    cfg = judge_config(url, {"up": "keyword:paris", "down": "keyword:paris"}, **ensemble)
    cfg["backends"]["m-down"] = {"urls": [DOWN], "retries": {"max_attempts": 1}, "timeouts": {"connect_s": 1}}
    return cfg


async def test_default_quorum_all_judges_outage_is_unavailable_not_a_skip(judge_emulator, annotator_factory):
    stub = await annotator_factory(_with_down_judge(judge_emulator.url, mode="pointwise", combine="mean",
                                                    annotator={"metrics_port": 0}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(request([GOOD, BAD]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    msg = err.value.details()
    assert "down (m-down: connect at http://127.0.0.1:9/v1" in msg and "1 of 2 judges answered" in msg
    assert "needs 2 (min_judges)" in msg

    async def items():
        for i in range(3):
            yield request([GOOD, BAD], id=f"r{i}")

    results = [r async for r in stub.AnnotateStream(items())]
    assert sorted(r.id for r in results) == ["r0", "r1", "r2"]
    assert all(r.WhichOneof("result") == "error" and r.error.code == "UNAVAILABLE" for r in results)
    assert all("m-down: connect" in r.error.message for r in results)

    port = stub.server.metrics_port
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    line = next(x for x in text.splitlines()
                if x.startswith("moaa_backend_errors_total{") and 'service="annotator"' in x and 'model="m-down"' in x)
    assert 'cause="connect"' in line and float(line.split()[-1]) >= 4
    assert 'moaa_rpc_errors_total{code="UNAVAILABLE",method="Annotate",service="annotator",transport="grpc"}' in text


async def test_min_judges_decides_with_the_judges_that_answered(judge_emulator, annotator_factory):
    stub = await annotator_factory(_with_down_judge(judge_emulator.url, mode="pointwise", combine="mean",
                                                    min_judges=1))
    resp = await stub.Annotate(request([GOOD, BAD]))
    assert resp.chosen_id == "c0" and not resp.skipped
    assert [j.judge for j in resp.judges] == ["up"]          # the failed judge is no abstainer in the decision
    assert [f.cause for f in resp.failures] == ["connect"] and resp.failures[0].model == "m-down"
    assert "decided by 1 of 2 judges; failed: down (m-down: connect" in resp.note
    assert {u.model for u in resp.usage} == {"m-up", "m-down"}


async def test_moa_aggregator_judge_outage_is_unavailable(judge_emulator, annotator_factory):
    cfg = judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "keyword:paris"}, aggregator="keyword:paris")
    cfg["backends"]["m-agg"] = {"urls": [DOWN], "retries": {"max_attempts": 1}, "timeouts": {"connect_s": 1}}
    stub = await annotator_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(request([GOOD, BAD]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "aggregator judge backend failed: agg (m-agg: connect" in err.value.details()


async def test_unreadable_reply_is_still_an_abstention_and_a_quality_skip(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "garbage", "b": "garbage"},
                                                mode="pointwise", combine="mean"))
    resp = await stub.Annotate(request([GOOD, BAD]))
    assert resp.skipped and resp.skip_reason.startswith("too_many_abstentions: 2 of 2") and not resp.failures


def test_min_judges_above_the_judges_is_a_config_error():
    with pytest.raises(ConfigError, match="min_judges=3 exceeds the 2 judges"):
        parse_config(judge_config("http://127.0.0.1:1/v1", {"a": "x", "b": "y"}, min_judges=3))
