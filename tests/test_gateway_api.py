"""The gateway's API surface: validation, overload, auth, TLS, health, reflection, metrics, shutdown,
Sample, ListModels, GenerateBatch. Real gRPC servers and emulators on 127.0.0.1."""
from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.fixtures.gateway import moa_config, request, user

FAST = {"ttft_s": 0.01}
S = common_pb2.SamplingParams


@pytest.fixture
async def gw(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "b": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["a", "b"], gateway={"max_prompt_chars": 1000})
    cfg["recipes"]["other"] = {"proposers": [{"model": "a"}], "aggregator": {"model": "agg"}}
    cfg["default_recipe"] = "moa"
    handle = await gateway_factory(cfg)
    handle.emu = emu
    return handle


def _msgs(*pairs):
    return [common_pb2.Message(role=r, content=c) for r, c in pairs]


GENERATE_INVALID = [
    ("empty conversation", dict(messages=[]), "messages is empty"),
    ("no user turn", dict(messages=_msgs(("system", "s"), ("assistant", "hello"))), "has no user message"),
    ("unknown role", dict(messages=_msgs(("robot", "hi"))), "use one of system, user, assistant"),
    ("system not first", dict(messages=_msgs(("user", "a"), ("system", "b"), ("user", "c"))), "only the first"),
    ("empty user text", dict(messages=_msgs(("user", ""))), "needs text"),
    ("unknown recipe", dict(messages=user("hi"), recipe="nope"), "unknown recipe 'nope'"),
    ("prompt too long", dict(messages=user("x" * 1001)), "over the limit of 1000"),
    ("temperature", dict(messages=user("hi"), proposer_sampling=S(temperature=3)), "proposer_sampling.temperature"),
    ("top_p", dict(messages=user("hi"), aggregator_sampling=S(top_p=0)), "aggregator_sampling.top_p"),
    ("max_tokens", dict(messages=user("hi"), aggregator_sampling=S(max_tokens=0)), "max_tokens=0"),
    ("presence", dict(messages=user("hi"), proposer_sampling=S(presence_penalty=5)), "presence_penalty"),
    ("frequency", dict(messages=user("hi"), proposer_sampling=S(frequency_penalty=-3)), "frequency_penalty"),
    ("stop count", dict(messages=user("hi"), proposer_sampling=S(stop=list("abcdefghijklmnopq"))), "at most 16"),
    ("stop empty", dict(messages=user("hi"), proposer_sampling=S(stop=[""])), "empty string"),
    ("min_proposers", dict(messages=user("hi"), min_proposers=3), "min_proposers=3 is out of range"),
    ("min_proposers 0", dict(messages=user("hi"), min_proposers=0), "min_proposers=0 is out of range"),
    ("first_k", dict(messages=user("hi"), first_k=5), "first_k=5 is out of range"),
    ("deadline", dict(messages=user("hi"), layer_deadline_s=-1), "layer_deadline_s=-1"),
    ("ensemble without annotate", dict(messages=user("hi"), ensemble="e"), "annotate is false"),
]


@pytest.mark.parametrize("name,fields,words", GENERATE_INVALID, ids=[g[0] for g in GENERATE_INVALID])
async def test_generate_validation(gw, name, fields, words):
    for call in (gw.stub.Generate, gw.stub.GenerateStream):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            res = call(gateway_pb2.GenerateRequest(**fields), timeout=5)
            if hasattr(res, "__aiter__"):
                async for _ in res:
                    pass
            else:
                await res
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in err.value.details()
    assert gw.emu.stats.requests == 0


async def test_no_default_recipe(gw_emulators, gateway_factory):
    emu = await gw_emulators()
    cfg = moa_config(emu.url, ["a"])
    cfg["recipes"]["other"] = {"proposers": [{"model": "a"}], "aggregator": {"model": "agg"}}
    gw = await gateway_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "default_recipe" in err.value.details()


async def test_request_over_max_request_bytes(gw_emulators, gateway_factory):
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"max_request_bytes": 2048}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request("x" * 4000), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


SAMPLE_INVALID = [
    ("no model", dict(n=1), "model is empty"),
    ("unknown model", dict(model="zzz", n=1), "unknown model 'zzz'"),
    ("n zero", dict(model="a", n=0), "n=0 is out of range"),
    ("n large", dict(model="a", n=65), "n=65 is out of range"),
    ("bad sampling", dict(model="a", n=1, sampling=S(temperature=-1)), "sampling.temperature"),
    ("annotate n=1", dict(model="a", n=1, annotate=True), "at least 2 samples"),
    ("ensemble without annotate", dict(model="a", n=2, ensemble="e"), "annotate is false"),
]


@pytest.mark.parametrize("name,fields,words", SAMPLE_INVALID, ids=[s[0] for s in SAMPLE_INVALID])
async def test_sample_validation(gw, name, fields, words):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(messages=user("hi"), **fields), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


async def test_sample_n(gw):
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=3, messages=user("hi"), id="row-7",
                                                          sampling=S(max_tokens=5, seed=1)), timeout=5)
    assert resp.id == "row-7" and resp.model == "a" and len(resp.samples) == 3
    assert [s.index for s in resp.samples] == [0, 1, 2] and all(s.text for s in resp.samples)
    assert resp.usage.completion_tokens == 15
    assert gw.emu.bodies("a")[-1]["n"] == 3


async def test_sample_usage_per_sample(gw_emulators, gateway_factory):
    """Sample.usage holds each sample's own tokens where the backend reported them apart: n sent as n
    requests, or n=1; a backend answering n in one request reports only the total (SampleResponse.usage)."""
    emu = await gw_emulators({"a": FAST, "b": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"], backends={"b": {"supports_n": False}}))
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="b", n=3, messages=user("hi"),
                                                          sampling=S(max_tokens=5)), timeout=5)
    assert [s.usage.completion_tokens for s in resp.samples] == [5, 5, 5]
    assert all(s.usage.prompt_tokens > 0 for s in resp.samples)
    assert sum(s.usage.total_tokens for s in resp.samples) == resp.usage.total_tokens
    one = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=1, messages=user("hi"),
                                                         sampling=S(max_tokens=5)), timeout=5)
    assert one.samples[0].usage == one.usage and one.usage.completion_tokens == 5
    native = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=3, messages=user("hi"),
                                                            sampling=S(max_tokens=5)), timeout=5)
    assert not any(s.HasField("usage") for s in native.samples) and native.usage.completion_tokens == 15


async def test_sample_annotate_needs_annotator(gw):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=2, messages=user("hi"), annotate=True), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "annotator_address" in err.value.details()


async def test_sample_annotator_unreachable_keeps_the_samples(gw_emulators, gateway_factory, unused_tcp_port):
    """The samples were paid for: they come back, without an annotation, the annotator's failure listed (as
    Generate(annotate) does), rather than the call failing and the client paying for them again."""
    emu = await gw_emulators({"a": FAST})
    cfg = moa_config(emu.url, ["a"])
    cfg["annotator_address"] = f"127.0.0.1:{unused_tcp_port}"
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=2, messages=user("hi"), annotate=True),
                                timeout=5)
    assert len(resp.samples) == 2 and all(s.text for s in resp.samples) and not resp.HasField("annotation")
    (failure,) = resp.failures
    assert failure.model == "annotator" and failure.cause == "unavailable" and "annotator at" in failure.message


def _metric(name: str, **labels) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"service": "gateway", **labels}) or 0.0


async def test_sample_backend_failure(gw_emulators, gateway_factory):
    emu = await gw_emulators({"sfail": {"error_rates": {500: 1.0}}})
    gw = await gateway_factory(moa_config(emu.url, ["sfail"], backends={"sfail": {"retries": {"max_attempts": 1}}}))
    before = _metric("moaa_backend_errors_total", model="sfail", cause="http_5xx")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="sfail", n=2, messages=user("hi")), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "'sfail'" in err.value.details()
    # counted in the backend metrics, as Generate's backends are
    assert _metric("moaa_backend_errors_total", model="sfail", cause="http_5xx") == before + 1


async def test_sample_tokens_are_counted_in_the_metrics(gw_emulators, gateway_factory):
    emu = await gw_emulators({"stok": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stok"]))
    before = _metric("moaa_tokens_total", model="stok", kind="completion")
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="stok", n=3, messages=user("hi"),
                                                          sampling=S(max_tokens=5)), timeout=5)
    assert resp.usage.completion_tokens == 15
    assert _metric("moaa_tokens_total", model="stok", kind="completion") == before + 15


async def test_sample_partial_failure_returns_answered_samples_and_failures(gw_emulators, gateway_factory):
    # n sent as 4 requests; with seed 0 the emulator's draws fail the 3rd and 4th arriving request (HTTP 500)
    emu = await gw_emulators({"a": {"error_rates": {500: 0.5}}}, seed=0)
    one_try = {"supports_n": False, "retries": {"max_attempts": 1}}
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"a": one_try}))
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=4, messages=user("hi")), timeout=5)
    assert len(resp.samples) == 2 and len(resp.failures) == 2
    assert all(s.text for s in resp.samples) and len({s.index for s in resp.samples}) == 2
    assert all(f.model == "a" and f.http_status == 500 for f in resp.failures)
    assert "2 of them failed" in resp.note
    # annotate needs two answered samples: with 1 of 2 answering, that sample still comes back (it was paid
    # for), with the failure and a note saying why nothing was annotated; the annotator is not called
    emu2 = await gw_emulators({"a": {"error_rates": {500: 0.5}}}, seed=1)  # seed 1: one fails, one answers
    cfg = moa_config(emu2.url, ["a"], backends={"a": one_try})
    cfg["annotator_address"] = "127.0.0.1:1"
    gw2 = await gateway_factory(cfg)
    resp = await gw2.stub.Sample(gateway_pb2.SampleRequest(model="a", n=2, messages=user("hi"), annotate=True),
                                 timeout=5)
    assert len(resp.samples) == 1 and [f.http_status for f in resp.failures] == [500]
    assert not resp.HasField("annotation") and "not annotated: 1 of 2 samples answered" in resp.note


async def test_an_empty_sample_is_a_failure_not_a_sample(gw_emulators, gateway_factory):
    """As an empty proposal is: no text to train on or to judge (a reasoning model that spent max_tokens)."""
    emu = await gw_emulators({"a": {"reasoning_tokens": 100}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"a": {"supports_n": False}}))
    with pytest.raises(grpc.aio.AioRpcError) as err:   # none answered: the call failed, as when all fail
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=2, messages=user("hi"),
                                                       sampling=S(max_tokens=5)), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == ("model 'a' answered none of the 2 samples (max_tokens: answer cut at max_tokens "
                                   "before any text: raise sampling.max_tokens)")


async def test_sample_with_stop_and_n_answers_every_choice(gw):
    """A stop string ends the n choices at different lengths (the emulator streams each to its own end)."""
    resp = await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=4, messages=user("hi"),
                                                          sampling=S(max_tokens=12, seed=3, stop=["e"])), timeout=5)
    # (was a stream cut: the emulator failed on the shorter choices); one stopped at its first token is empty
    assert len(resp.samples) + len(resp.failures) == 4 and {f.cause for f in resp.failures} <= {"empty"}
    assert len({len(s.text) for s in resp.samples}) > 1 and all("e" not in s.text for s in resp.samples)


async def test_caller_deadline_is_deadline_exceeded_not_a_backend_outage(gw_emulators, gateway_factory):
    """Backend calls cut by the caller's own deadline, in the proposers' layer or the aggregator's, are no
    outage (UNAVAILABLE would be retried with the same deadline). Timers race gRPC's: several calls."""
    emu = await gw_emulators({"a": FAST, "slow": {"ttft_s": 5}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["slow"]))
    gw_agg = await gateway_factory(moa_config(emu.url, ["a"], aggregator="slow"))
    codes = []
    for handle in (gw, gw_agg):
        for timeout in (0.3, 0.2, 0.1, 0.05, 0.01) * 2:
            for call in (handle.stub.Generate(request(), timeout=timeout),
                         handle.stub.Sample(gateway_pb2.SampleRequest(model="slow", n=2, messages=user("hi")),
                                            timeout=timeout)):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                codes.append((err.value.code(), err.value.details()))
    assert {c for c, _ in codes} == {grpc.StatusCode.DEADLINE_EXCEEDED}, [c for c in codes if c[0].name != "DEADLINE_EXCEEDED"]


async def test_list_models(gw):
    resp = await gw.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert sorted(m.name for m in resp.models) == ["a", "agg", "b"]
    assert all(m.replicas[0].url == gw.emu.url for m in resp.models)
    recipes = {r.name: r for r in resp.recipes}
    assert list(recipes["moa"].proposers) == ["a", "b"] and recipes["moa"].aggregator == "agg"


async def test_over_max_in_flight_is_resource_exhausted(gw_emulators, gateway_factory):
    emu = await gw_emulators({"stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stall"], gateway={"max_in_flight": 1}))
    first = gw.stub.GenerateStream(request())
    for _ in range(100):
        if emu.stats.in_flight:
            break
        await asyncio.sleep(0.02)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight=1" in err.value.details()
    first.cancel()


async def test_batch_results_keyed_and_errors_per_item(gw):
    items = [gateway_pb2.BatchItem(id=f"r{i}", request=request(f"question {i}")) for i in range(6)]
    items.insert(3, gateway_pb2.BatchItem(id="bad", request=gateway_pb2.GenerateRequest()))
    results = {}
    async for res in gw.stub.GenerateBatch(iter(items), timeout=20):
        results[res.id] = res
    assert sorted(results) == sorted(["bad"] + [f"r{i}" for i in range(6)])
    assert results["bad"].error.code == "INVALID_ARGUMENT" and "messages is empty" in results["bad"].error.message
    assert all(results[f"r{i}"].response.text for i in range(6))


async def test_batch_window_and_slow_reader(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {}, "agg": {}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"batch_window": 2}),
                               channel_factory=lambda port: grpc.aio.insecure_channel(
                                   f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]))
    big = S(max_tokens=400)
    items = [gateway_pb2.BatchItem(id=str(i), request=request(f"q{i}", proposer_sampling=big, aggregator_sampling=big))
             for i in range(12)]
    call = gw.stub.GenerateBatch(iter(items), timeout=60)
    first = await call.read()  # then stop reading for a while
    await asyncio.sleep(1.0)
    assert emu.stats.max_in_flight <= 2  # never more than the window in flight
    stalled_at = emu.stats.requests
    assert stalled_at <= 2 * 6, stalled_at  # the gateway stopped taking items while nobody read
    got = {first.id}
    while (res := await call.read()) is not grpc.aio.EOF:
        got.add(res.id)
    assert got == {str(i) for i in range(12)} and emu.stats.requests == 24


async def _check(channel, metadata=None):
    stub = gateway_pb2_grpc.MoAGatewayStub(channel)
    return await stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=5)


async def test_bearer_auth(gw_emulators, gateway_factory, tmp_path, monkeypatch):
    emu = await gw_emulators()
    (tmp_path / "tokens").write_text("# one per line\nfile-token\n")
    monkeypatch.setenv("MOAA_TEST_TOKENS", "env-token-1, env-token-2")
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {
        "tokens_file": str(tmp_path / "tokens"), "tokens_env": "MOAA_TEST_TOKENS"}}))
    for md, code in [(None, grpc.StatusCode.UNAUTHENTICATED),
                     ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
                     ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(gw.channel, md)
        assert err.value.code() == code
        with pytest.raises(grpc.aio.AioRpcError) as err:  # streaming methods too
            async for _ in gw.stub.GenerateStream(request(), metadata=md, timeout=5):
                pass
        assert err.value.code() == code
    for tok in ("file-token", "env-token-2"):
        await _check(gw.channel, (("authorization", f"Bearer {tok}"),))
    # a rotated Secret takes effect without a restart
    (tmp_path / "tokens").write_text("rotated-token\n")
    await asyncio.sleep(1.1)
    await _check(gw.channel, (("authorization", "Bearer rotated-token"),))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _check(gw.channel, (("authorization", "Bearer file-token"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # health stays open for probes
    h = await health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_and_mutual_tls(gw_emulators, gateway_factory, gw_tls_files):
    f = gw_tls_files
    emu = await gw_emulators()
    ca = open(f["ca.crt"], "rb").read()
    gw = await gateway_factory(
        moa_config(emu.url, ["a"], gateway={"tls": {"cert_file": f["server.crt"], "key_file": f["server.key"]}}),
        channel_factory=lambda port: grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca)))
    assert (await _check(gw.channel)).models
    async with grpc.aio.insecure_channel(gw.address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    mtls = await gateway_factory(moa_config(emu.url, ["a"], gateway={"tls": {
        "cert_file": f["server.crt"], "key_file": f["server.key"], "client_ca_file": f["ca.crt"]}}),
        channel_factory=lambda port: grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(
            ca, private_key=open(f["client.key"], "rb").read(), certificate_chain=open(f["client.crt"], "rb").read())))
    assert (await _check(mtls.channel)).models
    async with grpc.aio.secure_channel(mtls.address, grpc.ssl_channel_credentials(ca)) as no_cert:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(no_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_reflection_and_metrics(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"metrics_port": 0}))
    h = await health_pb2_grpc.HealthStub(gw.channel).Check(
        health_pb2.HealthCheckRequest(service="moaa.v1.MoAGateway"), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
    async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        assert "moaa.v1.MoAGateway" in [s.name for s in r.list_services_response.service]
        break
    await gw.stub.Generate(request(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError):
        await gw.stub.Generate(gateway_pb2.GenerateRequest(), timeout=5)
    port = gw.running.metrics_port
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    assert 'moaa_rpc_calls_total{code="OK",method="Generate",service="gateway",transport="grpc"}' in text
    assert 'moaa_rpc_errors_total{code="INVALID_ARGUMENT",method="Generate",service="gateway",transport="grpc"}' in text
    assert 'moaa_stage_latency_seconds_bucket{le="0.001",service="gateway",stage="layer1"}' in text
    assert 'moaa_backend_latency_seconds_count{model="agg",outcome="ok",service="gateway"}' in text
    assert 'moaa_tokens_total{kind="completion",model="a",service="gateway"}' in text
    assert 'moaa_rpc_in_flight{service="gateway"}' in text


async def test_graceful_shutdown_finishes_calls_in_flight(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {"ttft_s": 0.6}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    call = asyncio.ensure_future(gw.stub.Generate(request(), timeout=10))
    while not emu.stats.in_flight:
        await asyncio.sleep(0.01)
    stop = asyncio.ensure_future(gw.running.stop(5))
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError):  # new calls are refused while shutting down
        await gw.stub.Generate(request(), timeout=2)
    resp = await call
    assert resp.text
    await stop


async def test_logs_carry_request_id_but_no_prompt_or_token(gw_emulators, gateway_factory, caplog, monkeypatch):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    monkeypatch.setenv("MOAA_TEST_TOKENS2", "sekrit-token")
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_env": "MOAA_TEST_TOKENS2"}}))
    caplog.set_level(logging.INFO)
    secret = "my-private-prompt-text-12345"
    await gw.stub.Generate(request(secret, request_id="req-abc"), timeout=5,
                           metadata=(("authorization", "Bearer sekrit-token"),))
    from moaa.services.common.logs import JsonFormatter, RequestIdFilter
    fmt, flt = JsonFormatter(), RequestIdFilter()
    lines = []
    for rec in caplog.records:
        if not hasattr(rec, "request_id"):
            flt.filter(rec)
        lines.append(fmt.format(rec))
    assert any('"request_id": "req-abc"' in line and '"method": "Generate"' in line for line in lines)
    assert not any(secret in line or "sekrit-token" in line for line in lines)


async def test_a_unary_call_retries_an_aggregator_stream_cut_midway(gw_emulators, gateway_factory):
    """Nothing reached a unary caller when the aggregator's stream broke, so it is retried (on the other
    replica); a streamed caller that saw deltas gets the failure instead (never the text twice)."""
    good = await gw_emulators({"a": FAST, "agg": FAST})
    cut = await gw_emulators({"agg": {"disconnect_after_chunks": 1, "tokens_per_s": 200}})
    gw = await gateway_factory(moa_config(good.url, ["a"], backends={"agg": {"urls": [cut.url, good.url]}}))
    for _ in range(4):
        resp = await gw.stub.Generate(request(), timeout=10)
        assert resp.text and not resp.failures
    assert cut.stats.requests >= 1


async def test_an_empty_aggregator_answer_is_a_failure(gw_emulators, gateway_factory):
    """No SFT row can be made of it: UNAVAILABLE naming the cause and the setting, as for an empty sample."""
    emu = await gw_emulators({"a": FAST, "agg": {"reasoning_tokens": 100}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"supports_n": False}}))
    req = request()
    req.aggregator_sampling.max_tokens = 5
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "agg (max_tokens: answer cut at max_tokens before any text: raise the recipe's aggregator.sampling" \
           ".max_tokens (or aggregator_sampling.max_tokens))" in err.value.details()
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for ev in gw.stub.GenerateStream(req, timeout=10):
            events.append(ev)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [ev.failure.cause for ev in events if ev.HasField("failure")] == ["max_tokens"]
