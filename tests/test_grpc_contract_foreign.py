"""The gRPC contract as a client in another language sees it (audited from Node's @grpc/grpc-js with
proto-loader): what such clients send on the wire is reproduced here with generic calls and raw protobuf
bytes, so the suite needs no Node. Real gateway servers, the in-process emulator."""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from moaa.v1 import gateway_pb2
from tests.fixtures.gateway import moa_config, request

FAST = {"ttft_s": 0.01}
SLOW = {"ttft_s": 2.0}


async def _reflect(channel, service: str, req: reflection_pb2.ServerReflectionRequest):
    """One request on a reflection stream under `service`. grpc.reflection.v1 is v1alpha's protocol under
    another package name (the same messages and field numbers), so v1alpha's messages make v1's bytes."""
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    async for resp in call(iter([req]), timeout=5):
        return resp


async def test_reflection_answers_v1_as_well_as_v1alpha(gw_emulators, gateway_factory):
    # grpcurl, Postman and grpc-js-reflection-client(version "v1") ask grpc.reflection.v1 first; it was
    # UNIMPLEMENTED ("Method not found!"), grpcio-reflection serves only v1alpha
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    for service in ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"):
        listed = await _reflect(gw.channel, service, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = [s.name for s in listed.list_services_response.service]
        assert "moaa.v1.MoAGateway" in names and "grpc.health.v1.Health" in names, (service, names)
        described = await _reflect(gw.channel, service,
                                   reflection_pb2.ServerReflectionRequest(file_containing_symbol="moaa.v1.MoAGateway"))
        assert described.file_descriptor_response.file_descriptor_proto, service


async def test_x_request_id_metadata_names_the_call(gw_emulators, gateway_factory, caplog):
    # the HTTP door takes `x-request-id` (and README says it shares gRPC's request ids); a gRPC client or a
    # proxy (Envoy) sending that header had it ignored and got a generated id back
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    resp = await gw.stub.Generate(request(), metadata=(("x-request-id", "node-rid-1"),), timeout=10)
    assert resp.request_id == "node-rid-1"
    resp = await gw.stub.Generate(request(request_id="field-rid"), metadata=(("x-request-id", "hdr"),), timeout=10)
    assert resp.request_id == "field-rid"  # the request's own field wins
    # an error has no response to carry the id: it comes back in the trailing metadata, as the HTTP door's header
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(gateway_pb2.GenerateRequest(), metadata=(("x-request-id", "node-rid-2"),), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "node-rid-2") in tuple(err.value.trailing_metadata())
    call = gw.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    await call
    generated = dict(await call.trailing_metadata())["x-request-id"]
    assert generated and generated != "node-rid-2"
    # a stream's call takes the header too: its items' log lines are found under it
    caplog.set_level(logging.INFO, logger="moaa.rpc")
    items = [gateway_pb2.BatchItem(id="r1", request=request())]
    results = [r async for r in gw.stub.GenerateBatch(iter(items), metadata=(("x-request-id", "node-batch"),),
                                                      timeout=10)]
    assert [r.id for r in results] == ["r1"] and results[0].response.request_id == "node-batch-r1"
    assert any(getattr(r, "method", "") == "GenerateBatch" and r.request_id == "node-batch" for r in caplog.records)


async def test_a_stream_past_its_deadline_is_counted_deadline_exceeded(gw_emulators, gateway_factory, caplog):
    # grpc-js's `deadline` on GenerateBatch: the server logged and counted the call CANCELLED
    emu = await gw_emulators({"a": SLOW, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    caplog.set_level(logging.INFO, logger="moaa.rpc")
    seen = "OK"
    try:  # the gateway bounds the item by the call's deadline: under load its error answer can come first
        async for _ in gw.stub.GenerateBatch(iter([gateway_pb2.BatchItem(id="r1", request=request())]), timeout=0.3):
            pass
    except grpc.aio.AioRpcError as err:
        seen = err.code().name
    assert seen in ("DEADLINE_EXCEEDED", "OK")
    logged = await _logged_codes(caplog, "GenerateBatch")
    # counted as the client saw it. One race is not the server's to see: the item's answer ends the handler at
    # the deadline, and a client whose own deadline timer runs late (a loaded machine) takes the status that
    # was already on the wire, OK, while the server, past its deadline, counted DEADLINE_EXCEEDED
    assert logged == [seen] or (seen == "OK" and logged == ["DEADLINE_EXCEEDED"]), (seen, logged)

    async def idle():  # the request stream open, nothing in flight: the deadline reads as the stream's end
        await asyncio.Event().wait()
        yield gateway_pb2.BatchItem()

    for _ in range(3):
        caplog.clear()
        try:  # grpc itself may end the client's side of such a call cleanly at the deadline: not ours to pin
            async for _ in gw.stub.GenerateBatch(idle(), timeout=0.2):
                pass
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await _logged_codes(caplog, "GenerateBatch") == ["DEADLINE_EXCEEDED"]


async def _logged_codes(caplog, method: str) -> list[str]:
    for _ in range(50):  # the server notices the end of the call on its own schedule
        codes = [r.code for r in caplog.records if getattr(r, "method", "") == method]
        if codes:
            return codes
        await asyncio.sleep(0.05)
    return []


async def test_calls_refused_before_they_are_read_carry_the_request_id_too(gw_emulators, gateway_factory, monkeypatch,
                                                                           caplog):
    # a missing token, bytes that do not parse or a request over max_request_bytes are refused before the
    # servicer: their status came without the x-request-id the client named the call with, and the refused
    # call's log line had a new id
    monkeypatch.setenv("MOAA_TEST_FOREIGN_TOKENS", "t")
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={
        "auth": {"tokens_env": "MOAA_TEST_FOREIGN_TOKENS"}, "max_request_bytes": 2048}))
    caplog.set_level(logging.INFO, logger="moaa.rpc")
    raw = gw.channel.unary_unary("/moaa.v1.MoAGateway/Generate")
    token = ("authorization", "Bearer t")
    for rid, body, metadata, code in [
            ("no-token", request().SerializeToString(), (), grpc.StatusCode.UNAUTHENTICATED),
            ("garbage", b"\xff\xff\xff\xff\x0f", (token,), grpc.StatusCode.INVALID_ARGUMENT),
            ("too-big", request("x" * 4096).SerializeToString(), (token,), grpc.StatusCode.RESOURCE_EXHAUSTED)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await raw(body, metadata=(*metadata, ("x-request-id", rid)), timeout=5)
        assert err.value.code() == code, (rid, err.value.details())
        assert ("x-request-id", rid) in tuple(err.value.trailing_metadata()), rid
    refused = [r for r in caplog.records if getattr(r, "code", "") == "UNAUTHENTICATED"]
    assert [r.request_id for r in refused] == ["no-token"]
