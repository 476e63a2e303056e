"""Fuzzed requests (hypothesis) against every RPC of a running gateway (over the emulator) and annotator
(over the judge emulator): every answer is a typed status, never UNKNOWN or INTERNAL, stream items carry
typed error codes too, and each server still answers a good request afterwards.

Requests are built from the protobuf descriptors: every field set or not, with random values (huge
strings, negative and extreme numbers, NaN, empty and long lists) mixed with names the config knows, so
that valid requests reach the engines as well. Hypothesis runs in a worker thread; the calls run on the
test's event loop, where the servers live. Derandomized and without an example database, so CI sees
the same examples every run.
"""
from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moaa.services.config import parse_config
from moaa.services.gateway.server import start_gateway
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as annotate_request
from tests.fixtures.gateway import backend, request

# Not typed answers: a bug or an unhandled exception on the server.
UNTYPED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
           grpc.StatusCode.UNIMPLEMENTED}
UNTYPED_NAMES = {c.name for c in UNTYPED}
# CI: a fixed, modest set. MOAA_FUZZ_EXAMPLES=500 explores further (and randomly) by hand.
EXAMPLES = int(os.environ.get("MOAA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, derandomize="MOAA_FUZZ_EXAMPLES" not in os.environ, database=None,
                deadline=None, suppress_health_check=list(HealthCheck))

HUGE = "x" * 300_000  # over max_prompt_chars (200k) and max_candidate_bytes (256 KiB)
NAMES = {  # field name -> values the config knows (and a few it does not)
    "role": ["user", "user", "system", "assistant", "robot", ""],
    "recipe": ["", "moa", "one", "nope"],
    "model": ["a", "agg", "nope", ""],
    "ensemble": ["", "e", "nope"],
    "mode": ["", "pointwise", "pairwise", "moa", "bogus"],
    "judges": ["j1", "j2", "zz"],
    "id": ["r1", "r2", "r1", ""],
    "content": ["What is the capital of France?", "Paris.", ""],
    "text": ["Paris is the capital of France.", "Bananas.", "", " "],
    "stop": ["\n", "", "END"],
}


def _mostly(sane, wild=st.integers(0, 2**32 - 1)):
    """`sane` three times in four, else `wild` (one_of would weigh each distinct strategy alike)."""
    return st.integers(0, 3).flatmap(lambda i: wild if i == 0 else sane)


def _text(name: str):
    known = NAMES.get(name, [])
    wild = st.one_of(st.text(max_size=30), st.just(HUGE))
    return _mostly(st.sampled_from(known), wild) if known else wild


def _number(lo: int, hi: int):
    return st.one_of(st.integers(0, 6).filter(lambda v: lo <= v <= hi), st.integers(lo, hi))


def _scalar(f):
    t = f.type
    if t == FD.TYPE_STRING:
        return _text(f.name)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True, width=64 if
                                                       t == FD.TYPE_DOUBLE else 32))
    if t == FD.TYPE_UINT32:
        return _number(0, 2**32 - 1)
    if t == FD.TYPE_UINT64:
        return _number(0, 2**64 - 1)
    if t == FD.TYPE_INT32:
        return _number(-2**31, 2**31 - 1)
    if t == FD.TYPE_INT64:
        return _number(-2**63, 2**63 - 1)
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:
        return st.sampled_from([v.number for v in f.enum_type.values])
    raise AssertionError(f"no strategy for field type {t} ({f.full_name})")


def _is_map(f) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


def _field(f):
    if _is_map(f):
        key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key), _scalar(value), max_size=3)
    one = message(GetMessageClass(f.message_type)) if f.type == FD.TYPE_MESSAGE else _scalar(f)
    if f.is_repeated:
        return st.lists(one, max_size=4)
    return one


def _build(cls, values: dict):
    msg = cls()
    for name, value in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if _is_map(f):
            target.update(value)
        elif f.is_repeated:
            for v in value:
                target.add().CopyFrom(v) if f.type == FD.TYPE_MESSAGE else target.append(v)
        elif f.type == FD.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(msg, name, value)
    return msg


def message(cls):
    """A strategy for `cls` messages: each field set (a random or known value) or left unset."""
    fields = {f.name: st.deferred(lambda f=f: _field(f)) for f in cls.DESCRIPTOR.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _merged(base, over):
    base.MergeFrom(over)
    return base


def _knobs(proposer, aggregator, extra):
    req = gateway_pb2.GenerateRequest(proposer_sampling=proposer, aggregator_sampling=aggregator)
    req.MergeFrom(extra)
    return req


# Sampling that is mostly in range, so that calls get past validation to the engine and the backends.
SANE_SAMPLING = st.builds(
    lambda kw: common_pb2.SamplingParams(**kw),
    st.fixed_dictionaries({}, optional={
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "max_tokens": _mostly(st.integers(1, 32), st.integers(1, 4200)),
        "seed": st.integers(-2**63, 2**63 - 1), "stop": st.lists(st.sampled_from(["\n", "END"]), max_size=3),
        "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2)}))
KNOBS = st.builds(lambda kw: gateway_pb2.GenerateRequest(**kw), st.fixed_dictionaries({}, optional={
    "recipe": st.sampled_from(["moa", "moa", "one", "", "nope"]), "min_proposers": _mostly(st.integers(1, 2)),
    "first_k": _mostly(st.integers(1, 2)), "layer_deadline_s": _mostly(st.floats(0.05, 5.0), st.floats()),
    "metadata": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
    "annotate": st.booleans(), "ensemble": st.sampled_from(["", "e", "nope"]), "request_id": st.text(max_size=8)}))

# Valid conversations with fuzzed knobs reach the engine and the backends; fully random ones test validation.
SAMPLING = _mostly(SANE_SAMPLING, message(common_pb2.SamplingParams))
VALID_GENERATE = st.builds(lambda over: _merged(request(), over), st.builds(_knobs, SAMPLING, SAMPLING, KNOBS))
GENERATE = _mostly(VALID_GENERATE, message(gateway_pb2.GenerateRequest))
SAMPLE = _mostly(
    st.builds(lambda model, n, sampling, annotate, ensemble: gateway_pb2.SampleRequest(
        model=model, n=n, sampling=sampling, annotate=annotate, ensemble=ensemble, messages=request().messages),
        st.sampled_from(["a", "agg", "nope"]), _mostly(st.integers(1, 4), st.integers(0, 70)), SAMPLING, st.booleans(),
        st.sampled_from(["", "e", "nope"])),
    message(gateway_pb2.SampleRequest))
BATCH = st.lists(_mostly(st.builds(lambda i, r: gateway_pb2.BatchItem(id=i, request=r), _text("id"), GENERATE),
                         message(gateway_pb2.BatchItem)), max_size=4)
CANDIDATES = st.lists(st.builds(lambda i, t, m: annotator_pb2.Candidate(id=i, text=t, model=m),
                                 st.sampled_from(["", "c0", "c1", "c2", "c1"]),
                                 _mostly(st.sampled_from(NAMES["text"][:2]), _text("text")), st.text(max_size=5)),
                       min_size=0, max_size=5)
VALID_ANNOTATE = st.builds(
    lambda over, cands: _merged(annotate_request(["Paris is the capital.", "Bananas."]), over) if cands is None
    else _merged(annotate_request([]), over),
    st.builds(lambda kw: annotator_pb2.AnnotateRequest(**kw), st.fixed_dictionaries({}, optional={
        "ensemble": st.sampled_from(["", "e", "nope"]),
        "judges": st.lists(st.sampled_from(["j1", "j2", "zz"]), max_size=3),
        "mode": st.sampled_from(["", "pointwise", "pairwise", "moa", "bogus"]), "seed": st.integers(0, 2**64 - 1),
        "id": _mostly(st.uuids().map(lambda u: u.hex[:8]), st.sampled_from(["", "r1"])), "candidates": CANDIDATES,
        "reference": st.builds(lambda t: annotator_pb2.Candidate(id="ref", text=t), _text("text"))})),
    st.one_of(st.none(), st.just(1)))
ANNOTATE = _mostly(VALID_ANNOTATE, message(annotator_pb2.AnnotateRequest))


@pytest.fixture(scope="module")
async def stack(emulator_factory, judge_emulator, annotator_factory):
    """A gateway over the emulator (recipes moa: 2 proposers x 2 layers, one) wired to an annotator over
    the judge emulator."""
    emu = await emulator_factory()
    cfg = judge_config(judge_emulator.url, {"j1": "keyword:paris", "j2": "longest+text"}, aggregator="longest",
                       annotator={"max_in_flight": 4096})
    annotator = await annotator_factory(cfg)
    gw_cfg = {k: v for k, v in cfg.items() if k != "annotator"}
    gw_cfg["backends"].update({n: backend(emu.url) for n in ("a", "b", "agg")})
    gw_cfg.update(
        recipes={"moa": {"proposers": [{"model": "a"}, {"model": "b"}], "aggregator": {"model": "agg"}, "layers": 2},
                 "one": {"proposers": [{"model": "a"}], "aggregator": {"model": "agg"}}},
        default_recipe="moa", annotator_address=annotator.server.address, gateway={"port": 0, "http_port": None})
    running = await start_gateway(parse_config(gw_cfg), probes=False)
    channel = grpc.aio.insecure_channel(running.address)
    yield {"gateway": gateway_pb2_grpc.MoAGatewayStub(channel), "annotator": annotator, "gw_channel": channel,
           "loop": asyncio.get_running_loop()}
    await channel.close()
    await running.stop(0)


def _typed(call_result) -> None:
    code, details, items = call_result
    assert code not in UNTYPED, (code, details)
    # grpc's own answers when our status could not be sent (e.g. details over the 16 KiB header limit)
    assert not details.startswith(("Stream removed", "Unexpected")), (code, details[:300])
    errors = [i.error for i in items if not isinstance(i, bytes) and "error" in i.DESCRIPTOR.fields_by_name]
    bad = [(e.code, e.message) for e in errors if e.code in UNTYPED_NAMES]
    assert not bad, bad


async def _call(make_call, stream_out: bool):
    """(status code, stream results) of one call; errors are answers, not exceptions."""
    items = []
    try:
        call = make_call()
        if stream_out:
            async for item in call:
                items.append(item)
        else:
            await call
    except grpc.aio.AioRpcError as err:
        if os.environ.get("MOAA_FUZZ_DEBUG"):
            print("   ", err.code().name, err.details()[:150])
        return err.code(), err.details() or "", items
    return grpc.StatusCode.OK, "", items


def _fuzz(stack, strategy, make_call, stream_out: bool):
    """Runs hypothesis in this (worker) thread; each example's call runs on the servers' loop."""
    loop = stack["loop"]
    seen: dict[str, int] = {}

    @FUZZ
    @given(strategy)
    def check(req):
        result = asyncio.run_coroutine_threadsafe(_call(lambda: make_call(req), stream_out), loop).result(60)
        seen[result[0].name] = seen.get(result[0].name, 0) + 1
        for item in result[2]:  # stream results: responses and item errors
            kind = "item " + (item.error.code if getattr(item, "error", None) and item.error.code else "ok") \
                if not isinstance(item, bytes) and "error" in item.DESCRIPTOR.fields_by_name else None
            if kind:
                seen[kind] = seen.get(kind, 0) + 1
        _typed(result)

    check()
    return seen


T = 15  # per call: a DEADLINE_EXCEEDED is a typed answer, but none is expected


@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "GenerateBatch", "Sample", "ListModels"])
async def test_fuzzed_gateway_requests_get_typed_statuses(stack, rpc):
    gw = stack["gateway"]
    cases = {
        "Generate": (GENERATE, lambda r: gw.Generate(r, timeout=T), False),
        "GenerateStream": (GENERATE, lambda r: gw.GenerateStream(r, timeout=T), True),
        "GenerateBatch": (BATCH, lambda items: gw.GenerateBatch(iter(items), timeout=T), True),
        "Sample": (SAMPLE, lambda r: gw.Sample(r, timeout=T), False),
        "ListModels": (message(gateway_pb2.ListModelsRequest), lambda r: gw.ListModels(r, timeout=T), False),
    }
    strategy, make_call, stream_out = cases[rpc]
    seen = await asyncio.to_thread(_fuzz, stack, strategy, make_call, stream_out)
    print(rpc, seen)
    assert sum(seen.values()) >= (1 if rpc == "ListModels" else EXAMPLES // 2), seen  # ListModels has one request
    assert (await gw.Generate(request(), timeout=T)).text  # the gateway still answers


@pytest.mark.parametrize("rpc", ["Annotate", "AnnotateStream"])
async def test_fuzzed_annotator_requests_get_typed_statuses(stack, rpc):
    ann: annotator_pb2_grpc.AnnotatorStub = stack["annotator"]
    if rpc == "Annotate":
        seen = await asyncio.to_thread(_fuzz, stack, ANNOTATE, lambda r: ann.Annotate(r, timeout=T), False)
    else:
        seen = await asyncio.to_thread(_fuzz, stack, st.lists(ANNOTATE, max_size=4),
                                       lambda items: ann.AnnotateStream(iter(items), timeout=T), True)
    print(rpc, seen)
    assert sum(seen.values()) >= EXAMPLES // 2, seen
    good = await ann.Annotate(annotate_request(["Paris is the capital of France.", "Bananas."]), timeout=T)
    assert good.chosen_id or good.skipped  # the annotator still answers


RAW = [("/moaa.v1.MoAGateway/Generate", "unary_unary"), ("/moaa.v1.MoAGateway/GenerateStream", "unary_stream"),
       ("/moaa.v1.MoAGateway/GenerateBatch", "stream_stream"), ("/moaa.v1.MoAGateway/Sample", "unary_unary"),
       ("/moaa.v1.MoAGateway/ListModels", "unary_unary"), ("/moaa.v1.Annotator/Annotate", "unary_unary"),
       ("/moaa.v1.Annotator/AnnotateStream", "stream_stream")]


async def test_fuzzed_raw_bytes_get_typed_statuses(stack):
    """Random bytes through generic calls (identity serializers): most do not parse (INVALID_ARGUMENT),
    some parse as a message with unknown fields and are answered like any request."""
    channels = {"MoAGateway": stack["gw_channel"],
                "Annotator": grpc.aio.insecure_channel(stack["annotator"].server.address)}

    def make(method, kind):
        channel = channels[method.split("/")[1].split(".")[-1]]
        rpc = getattr(channel, kind)(method)
        if kind.startswith("stream"):
            return lambda raw: rpc(iter([raw]), timeout=T)
        return lambda raw: rpc(raw, timeout=T)

    try:
        for method, kind in RAW:
            seen = await asyncio.to_thread(_fuzz, stack, st.binary(max_size=200), make(method, kind),
                                           kind.endswith("stream"))
            print(method, seen)
            assert "INVALID_ARGUMENT" in seen, (method, seen)
    finally:
        await channels["Annotator"].close()
    assert (await stack["gateway"].Generate(request(), timeout=T)).text


async def test_fuzzed_authorization_metadata_gets_typed_statuses(gw_emulators, gateway_factory, monkeypatch):
    """Random `authorization` values (printable ASCII: what HTTP/2 headers carry) against an auth-enabled
    gateway: UNAUTHENTICATED or OK, nothing else."""
    emu = await gw_emulators()
    monkeypatch.setenv("MOAA_TEST_FUZZ_TOKENS", "good-token")
    gw = await gateway_factory({"backends": {"a": backend(emu.url)},
                                "recipes": {"moa": {"proposers": [{"model": "a"}], "aggregator": {"model": "a"}}},
                                "gateway": {"port": 0, "auth": {"tokens_env": "MOAA_TEST_FUZZ_TOKENS"}}})
    header = st.one_of(st.just("Bearer good-token"), st.builds(lambda t: "Bearer " + t, st.text(
        st.characters(min_codepoint=32, max_codepoint=126), max_size=40)),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
    seen = await asyncio.to_thread(_fuzz, {"loop": asyncio.get_running_loop()}, header, lambda value: gw.stub.ListModels(
        gateway_pb2.ListModelsRequest(), metadata=(("authorization", value),), timeout=T), False)
    assert set(seen) <= {"OK", "UNAUTHENTICATED"}, seen
    assert "UNAUTHENTICATED" in seen
