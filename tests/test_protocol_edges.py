"""Protocol edges (issue 12, item 6): authentication, undecodable bytes, INTERNAL's message, wrong-shaped
backend chunks, the max_tokens bound, batch item ids and the CLI's number checks. Real gRPC servers,
the emulators, and a small real aiohttp server for chunks no emulator sends."""
from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moaa.cli.main import main
from moaa.services.backend import BackendError
from moaa.services.common.errors import InvalidArgument
from moaa.services.common.rpc import CallGuard, guarded
from moaa.services.common.server import start_server
from moaa.services.common.validation import check_item_id, check_max_tokens
from moaa.services.config import ServerConfig
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2, gateway_pb2
from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as annotate_request
from tests.fixtures.gateway import moa_config, request
from tests.test_backend_client import MSGS, make_cfg

FAST = {"ttft_s": 0.01}
S = common_pb2.SamplingParams
GOOD, BAD = "Paris is the capital of France.", "Bananas are yellow."


async def _list_models(gw, token=None):
    md = (("authorization", f"Bearer {token}"),) if token else None
    return await gw.stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=md, timeout=5)


# -- authentication -----------------------------------------------------------------------------------

async def test_wrong_token_is_unauthenticated_and_deleting_the_file_revokes(gw_emulators, gateway_factory,
                                                                             tmp_path, caplog):
    emu = await gw_emulators()
    tokens = tmp_path / "tokens"
    tokens.write_text("good-token\n")
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_file": str(tokens)}}))
    await _list_models(gw, "good-token")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _list_models(gw, "wrong-token")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in err.value.details()

    tokens.unlink()  # the Secret was removed: its tokens must stop working (fail closed)
    await asyncio.sleep(1.1)
    with caplog.at_level(logging.WARNING, logger="moaa.services.common.auth"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _list_models(gw, "good-token")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert any("no longer accepted" in r.getMessage() for r in caplog.records)
    # kubelet probes carry no token: health stays open
    h = await health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING

    tokens.write_text("new-token\n")  # a new Secret takes effect again
    await asyncio.sleep(1.1)
    await _list_models(gw, "new-token")


async def test_a_refused_request_stream_is_unauthenticated_however_many_items_it_sent(
        gw_emulators, gateway_factory, judge_emulator, annotator_factory, monkeypatch):
    # grpc.aio's client turns a write that fails after the server's status into INTERNAL "Internal error
    # from Core" (grpc/grpc#36066): refused before reading, 5 items on the way came back INTERNAL 7 times in 10
    monkeypatch.setenv("MOAA_TEST_EDGE_TOKENS", "t")
    auth = {"auth": {"tokens_env": "MOAA_TEST_EDGE_TOKENS"}}
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=auth))
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, annotator=auth))
    calls = {"GenerateBatch": lambda: gw.stub.GenerateBatch(
                 iter([gateway_pb2.BatchItem(id=str(i), request=request()) for i in range(5)]), timeout=10),
             "AnnotateStream": lambda: stub.AnnotateStream(
                 iter([annotate_request([GOOD, BAD], id=str(i)) for i in range(5)]), timeout=10)}
    for name, call in calls.items():
        for _ in range(10):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call():
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.value.details())
            assert "missing bearer token" in err.value.details()


# -- undecodable request bytes ------------------------------------------------------------------------

GARBAGE = b"\xff\xff\xff\xff\x0f"  # a varint that never ends: not any protobuf message


async def _raw_call(channel, method: str, kind: str, count: int = 1):
    """Sends GARBAGE (`count` times on a request stream) through a generic call with identity serializers;
    returns the status code."""
    try:
        if kind.startswith("unary"):
            call = getattr(channel, kind)(method)(GARBAGE, timeout=5)
        else:
            call = getattr(channel, kind)(method)(iter([GARBAGE] * count), timeout=5)
        if kind.endswith("stream"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


RAW_METHODS = [
    ("/moaa.v1.MoAGateway/Generate", "unary_unary"),
    ("/moaa.v1.MoAGateway/GenerateStream", "unary_stream"),
    ("/moaa.v1.MoAGateway/GenerateBatch", "stream_stream"),
    ("/moaa.v1.MoAGateway/Sample", "unary_unary"),
    ("/moaa.v1.MoAGateway/ListModels", "unary_unary"),
    ("/grpc.health.v1.Health/Check", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "unary_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "stream_stream"),
]


async def test_undecodable_bytes_are_invalid_argument(gw_emulators, gateway_factory, judge_emulator,
                                                      annotator_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    for method, kind in RAW_METHODS:
        code, details = await _raw_call(gw.channel, method, kind)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "do not parse as" in details and "send a serialized" in details
    assert (await gw.stub.Generate(request(), timeout=10)).text  # still answers

    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise"))
    async with grpc.aio.insecure_channel(stub.server.address) as channel:
        for method, kind in [("/moaa.v1.Annotator/Annotate", "unary_unary"),
                             ("/moaa.v1.Annotator/AnnotateStream", "stream_stream")]:
            code, details = await _raw_call(channel, method, kind)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "moaa.v1.AnnotateRequest" in details, (method, details)
        for _ in range(10):  # refused while more items are on the way: still the status, not INTERNAL
            code, details = await _raw_call(channel, "/moaa.v1.Annotator/AnnotateStream", "stream_stream", count=5)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert (await stub.Annotate(annotate_request([GOOD, BAD]), timeout=10)).chosen_id == "c0"


async def test_items_held_before_undecodable_bytes_are_answered_first(gw_emulators, gateway_factory):
    """Three valid items, then bytes that are no BatchItem at once: the three (their backend work started)
    are answered, then the stream ends INVALID_ARGUMENT, as a shutdown answers what it holds first."""
    emu = await gw_emulators({"a": {"ttft_s": 0.3}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    items = [gateway_pb2.BatchItem(id=f"g{i}", request=request(f"question {i}")).SerializeToString()
             for i in range(3)]
    call = gw.channel.stream_stream("/moaa.v1.MoAGateway/GenerateBatch")(iter([*items, GARBAGE]), timeout=20)
    answered = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for raw in call:
            result = gateway_pb2.BatchResult.FromString(raw)
            assert result.HasField("response"), result
            answered.append(result.id)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not parse as" in err.value.details()
    assert sorted(answered) == ["g0", "g1", "g2"]


async def test_undecodable_bytes_without_a_token_are_unauthenticated(gw_emulators, gateway_factory, monkeypatch):
    emu = await gw_emulators()
    monkeypatch.setenv("MOAA_TEST_EDGE_TOKENS", "t")
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_env": "MOAA_TEST_EDGE_TOKENS"}}))
    code, _ = await _raw_call(gw.channel, "/moaa.v1.MoAGateway/Generate", "unary_unary")
    assert code == grpc.StatusCode.UNAUTHENTICATED  # authentication is checked before the bytes are looked at


async def test_a_huge_field_echoed_in_an_error_is_clipped(gw_emulators, gateway_factory):
    # found by fuzzing: the details echoing a 300k-character model name exceeded the 16 KiB header limit,
    # and the client saw RESOURCE_EXHAUSTED "Stream removed" instead of our INVALID_ARGUMENT
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="m" * 300_000, n=1, messages=request().messages),
                             timeout=10)
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 2100
    assert details.startswith("unknown model 'mmm") and "characters cut" in details and "use one of a" in details


# -- INTERNAL does not leak the exception -------------------------------------------------------------

class _Broken(annotator_pb2_grpc.AnnotatorServicer):
    """A servicer with a bug: the guard must answer INTERNAL without the exception's text."""

    def __init__(self, guard: CallGuard):
        self.guard = guard

    @guarded
    async def Annotate(self, request, context, rid):
        raise RuntimeError("secret-detail /etc/moaa/config.yaml")


async def test_internal_answers_a_generic_message_with_the_request_id(caplog):
    running = await start_server(ServerConfig(port=0), "broken",
                                 lambda server, guard: annotator_pb2_grpc.add_AnnotatorServicer_to_server(
                                     _Broken(guard), server), ["moaa.v1.Annotator"])
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            with caplog.at_level(logging.ERROR, logger="moaa.rpc"):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await annotator_pb2_grpc.AnnotatorStub(channel).Annotate(
                        annotator_pb2.AnnotateRequest(request_id="rid-123"), timeout=5)
    finally:
        await running.stop(0)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    details = err.value.details()
    assert "rid-123" in details and "secret" not in details and "RuntimeError" not in details
    logged = [r for r in caplog.records if r.exc_info]
    assert logged and "secret-detail" in str(logged[0].exc_info[1])  # the details stay in the server's log


# -- wrong-shaped backend chunks ----------------------------------------------------------------------

def _sse(*events) -> bytes:
    return b"".join(b"data: " + json.dumps(ev).encode() + b"\n\n" for ev in events) + b"data: [DONE]\n\n"


OK_CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
END_CHUNK = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
WRONG_SHAPES = {
    "choices is a string": {"choices": "hello"},
    "choice is a number": {"choices": [1]},
    "delta is a string": {"choices": [{"index": 0, "delta": "hi"}]},
    "content is a number": {"choices": [{"index": 0, "delta": {"content": 5}}]},
    "index is text": {"choices": [{"index": "first", "delta": {"content": "x"}}]},
    "finish_reason is a list": {"choices": [{"index": 0, "delta": {}, "finish_reason": ["stop"]}]},
    "usage is a list": {"choices": [], "usage": [1, 2]},
    "negative token count": {"choices": [], "usage": {"prompt_tokens": -5, "completion_tokens": 1}},
    "token count is text": {"choices": [], "usage": {"prompt_tokens": "many"}},
}


@pytest.fixture
async def shape_server():
    """A real aiohttp server answering /v1/chat/completions with `server.body` (SSE or JSON)."""
    state = {"body": b"", "type": "text/event-stream"}

    async def chat(req: web.Request) -> web.Response:
        await req.read()
        return web.Response(body=state["body"], content_type=state["type"])

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
    yield state
    await runner.cleanup()


@pytest.mark.parametrize("name", list(WRONG_SHAPES))
async def test_wrong_shaped_chunk_is_a_typed_malformed_failure(shape_server, pool_of, name):
    in_usage = "usage" in name or "token" in name  # a usage chunk comes last
    shape_server["body"] = (_sse(OK_CHUNK, END_CHUNK, WRONG_SHAPES[name]) if in_usage
                            else _sse(OK_CHUNK, WRONG_SHAPES[name], END_CHUNK))
    pool = await pool_of({"m": make_cfg(shape_server["url"], retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "malformed", exc.value
    with pytest.raises(BackendError) as exc:
        async for _ in pool.client("m").stream_chat(MSGS):
            pass
    assert exc.value.cause == "malformed", exc.value


async def test_wrong_shaped_non_streamed_answer_is_malformed(shape_server, pool_of):
    shape_server.update(type="application/json", body=json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": ["not", "text"]}}]}).encode())
    pool = await pool_of({"m": make_cfg(shape_server["url"], retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "malformed" and "content" in exc.value.message


async def test_wrong_shaped_chunks_reach_the_gateway_as_failures_not_internal(shape_server, gw_emulators,
                                                                               gateway_factory):
    shape_server["body"] = _sse(OK_CHUNK, WRONG_SHAPES["delta is a string"], END_CHUNK)
    emu = await gw_emulators({"good": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["good", "bad"], backends={"bad": {"urls": [shape_server["url"]]}})
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(request(), timeout=10)
    assert resp.text and [(f.model, f.cause) for f in resp.failures] == [("bad", "malformed")]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # the only proposer: a typed UNAVAILABLE
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="bad", messages=request().messages, n=1), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "malformed" in err.value.details()


# -- max_tokens bound ---------------------------------------------------------------------------------

def test_max_tokens_limit_rule():
    check_max_tokens(None, model="m", context_window=4096, field="s")
    check_max_tokens(4080, model="m", context_window=4096, field="s")
    check_max_tokens(2048, model="m", context_window=4096, field="s", with_references=True)
    with pytest.raises(InvalidArgument, match=r"use at most 4080"):
        check_max_tokens(4081, model="m", context_window=4096, field="s")
    with pytest.raises(InvalidArgument, match=r"s.max_tokens=2049 .* model 'm' .*use at most 2048"):
        check_max_tokens(2049, model="m", context_window=4096, field="s", with_references=True)


async def test_huge_max_tokens_is_invalid_argument_saying_the_limit(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["a"], backends={"agg": {"context_window": 1024}})
    gw = await gateway_factory(cfg)
    cases = [
        (request(aggregator_sampling=S(max_tokens=4_000_000_000)), "aggregator_sampling.max_tokens", "at most 512"),
        (request(proposer_sampling=S(max_tokens=5000)), "proposer_sampling.max_tokens", "at most 4080"),
    ]
    for req, field, limit in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.Generate(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details() and limit in err.value.details(), err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="agg", messages=request().messages, n=1,
                                                       sampling=S(max_tokens=1024)), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 1008" in err.value.details()
    assert (await gw.stub.Generate(request(aggregator_sampling=S(max_tokens=8)), timeout=10)).text


# -- batch item ids -----------------------------------------------------------------------------------

def test_check_item_id():
    seen: set[str] = set()
    check_item_id("a", seen)
    with pytest.raises(InvalidArgument, match="already sent"):
        check_item_id("a", seen)
    with pytest.raises(InvalidArgument, match="is empty"):
        check_item_id("", seen)


async def test_generate_batch_empty_and_duplicate_ids_are_item_errors(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"batch_window": 1}))
    items = [gateway_pb2.BatchItem(id=i, request=request(f"q {n}")) for n, i in enumerate(["x", "", "x", "y"])]
    results = [r async for r in gw.stub.GenerateBatch(iter(items), timeout=20)]
    got = sorted((r.id, r.WhichOneof("result"), r.error.code) for r in results)
    assert got == [("", "error", "INVALID_ARGUMENT"), ("x", "error", "INVALID_ARGUMENT"),
                   ("x", "response", ""), ("y", "response", "")]
    messages = {r.error.message for r in results if r.error.code}
    assert any("is empty" in m for m in messages) and any("already sent" in m for m in messages)


async def test_annotate_stream_empty_and_duplicate_ids_are_item_errors(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise",
                                                annotator={"batch_window": 1}))

    async def items():
        for i in ["x", "", "x", "y"]:
            yield annotate_request([GOOD, BAD], id=i)

    results = [r async for r in stub.AnnotateStream(items(), timeout=20)]
    got = sorted((r.id, r.WhichOneof("result"), r.error.code) for r in results)
    assert got == [("", "error", "INVALID_ARGUMENT"), ("x", "error", "INVALID_ARGUMENT"),
                   ("x", "response", ""), ("y", "response", "")]


# -- CLI numbers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["gateway", "serve", "--config", "x.yaml", "--port", "70000"],
    ["annotator", "serve", "--config", "x.yaml", "--port", "-1"],
    ["backend", "emulate", "--port", "70000"],
    ["generate", "--max-tokens", "-1", "hi"],
    ["generate", "--timeout", "0", "hi"],
    ["pipeline", "run", "--limit", "0"],
    ["pipeline", "run", "--token-budget", "many"],
    ["sample", "--model", "m", "--prompts", "p", "--out", "o", "--n", "0"],
    ["train", "sft", "--data", "d", "--model", "m", "--out", "o", "--max-steps", "-3"],
])
def test_cli_bad_numbers_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and ": error: argument --" in err, err
