"""The gRPC transport as it runs in production (services/common/transport.py): connection age (rebalancing
behind a Kubernetes Service), keepalive both ways (dead peers), a client that never reads, and the cap on
streams per connection, message compression. Real gateways on 127.0.0.1, real emulated backends, the one client channel builder
(moaa.client.Endpoint), and a TCP proxy in between that counts connections and can black-hole them the
way a lost node does (no FIN, no RST: bytes just stop)."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moaa.client.endpoint import Endpoint
from moaa.client.window import windowed
from moaa.services.common.transport import CLIENT_KEEPALIVE_S, TransportConfig
from moaa.services.config import ConfigError, GatewayConfig, parse_config
from moaa.v1 import annotator_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as judge_request
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.waiting import wait_for

FAST = {"ttft_s": 0.01}
NO_AGE = {"max_connection_age_s": None}


class Proxy:
    """127.0.0.1 TCP proxy to `port`. `blackhole()` stops forwarding on the connections open now, both ways,
    without closing them (a lost node); connections made after it are forwarded as before (the Service's
    other pods)."""

    def __init__(self, port: int):
        self.port = port
        self.connections = 0
        self.sent = 0   # bytes forwarded from clients
        self.received = 0   # bytes forwarded to clients
        self._live: list[dict] = []
        self._server = None

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _accept(self, creader, cwriter):
        self.connections += 1
        sreader, swriter = await asyncio.open_connection("127.0.0.1", self.port)
        conn = {"dead": False, "writers": (cwriter, swriter)}
        self._live.append(conn)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    if conn["dead"]:
                        continue   # swallowed: the peer hears nothing, and no FIN either
                    if writer is swriter:
                        self.sent += len(data)
                    else:
                        self.received += len(data)
                    writer.write(data)
                    await writer.drain()
                if not conn["dead"]:
                    writer.close()
            except (ConnectionError, asyncio.CancelledError):
                pass
        await asyncio.gather(pipe(creader, swriter), pipe(sreader, cwriter))

    def blackhole(self) -> None:
        for conn in self._live:
            conn["dead"] = True

    async def close(self) -> None:
        self._server.close()
        for conn in self._live:
            for w in conn["writers"]:
                w.close()


@pytest.fixture
async def proxy_to():
    made: list[Proxy] = []

    async def make(port: int) -> Proxy:
        made.append(await Proxy(port).start())
        return made[-1]
    yield make
    for p in made:
        await p.close()


def transport(**kw) -> dict:
    return {"transport": kw}


def items(n: int) -> list[gateway_pb2.BatchItem]:
    return [gateway_pb2.BatchItem(id=f"r{i}", request=request(f"question {i}")) for i in range(n)]


def generate_batch(ch):
    return gateway_pb2_grpc.MoAGatewayStub(ch).GenerateBatch


async def run_batch(ep: Endpoint, n: int, window: int, method=generate_batch, reqs=None) -> tuple[dict, int]:
    """`reqs` (default `items(n)`) through the window driver over `method(channel)` (GenerateBatch): results
    by id (each id once) and the number of calls it took."""
    calls, got = 0, {}
    async with ep.channel() as ch:
        call = method(ch)

        def rpc(*a, **kw):
            nonlocal calls
            calls += 1
            return call(*a, **kw)
        async for res in windowed(rpc, items(n) if reqs is None else reqs, ep=ep, what="stream", window=window):
            assert res.id not in got, f"{res.id} answered twice"
            got[res.id] = res
    return got, calls


def test_defaults_accept_our_clients_and_keep_overload_an_error():
    """The server's ping policy accepts our clients' keepalive (else GOAWAY too_many_pings), and the stream
    cap is above max_in_flight (else overload would queue in clients instead of RESOURCE_EXHAUSTED)."""
    t, server = TransportConfig(), GatewayConfig()
    assert t.min_client_ping_interval_s <= CLIENT_KEEPALIVE_S
    assert t.max_concurrent_streams > server.max_in_flight
    assert t.max_connection_age_grace_s > t.max_connection_age_s * 1.1   # a stream closed by age can finish
    opts = dict(t.server_options())
    assert opts["grpc.max_connection_age_ms"] == 300_000 and opts["grpc.keepalive_permit_without_calls"] == 1


@pytest.mark.parametrize("bad, word", [({"max_connection_age_s": 0}, "max_connection_age_s"),
                                       ({"keepalive_time_s": "10"}, "keepalive_time_s"),
                                       ({"max_concurrent_streams": 0}, "max_concurrent_streams"),
                                       ({"max_connection_age": 5}, "max_connection_age")])
def test_bad_transport_settings_are_named(bad, word):
    with pytest.raises(ConfigError) as err:
        parse_config(moa_config("http://127.0.0.1:1", ["a"], gateway=transport(**bad)))
    assert f"gateway.transport.{word}" in str(err.value)


async def test_compression_shrinks_what_the_server_sends(gw_emulators, gateway_factory, proxy_to):
    """transport.compression: gzip: the batch results' bytes on the wire shrink, and our clients read them. gRPC
    core sends gzip even to a client that disabled it (it does not consult grpc-accept-encoding): such a client
    fails INTERNAL naming the algorithm, which is why compression is off by default (README)."""
    emu = await gw_emulators({"a": FAST | {"default_max_tokens": 400}, "agg": FAST | {"default_max_tokens": 400}})
    wire, texts = {}, {}
    for algo in ("none", "gzip"):
        gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(compression=algo)))
        proxy = await proxy_to(gw.running.port)
        got, _ = await run_batch(Endpoint(proxy.address), 8, window=8)
        assert sorted(got) == [f"r{i}" for i in range(8)] and all(r.HasField("response") for r in got.values())
        wire[algo], texts[algo] = proxy.received, sum(len(r.response.text) for r in got.values())
    assert texts["gzip"] > 8 * 1000
    assert wire["gzip"] < 0.8 * wire["none"], wire
    identity_only = [("grpc.compression_enabled_algorithms_bitset", 1)]
    async with grpc.aio.insecure_channel(gw.running.address, options=identity_only) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gateway_pb2_grpc.MoAGatewayStub(ch).Generate(request(), timeout=20)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "gzip" in err.value.details()


async def test_connection_age_moves_clients_to_a_new_connection(gw_emulators, gateway_factory, proxy_to):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        max_connection_age_s=0.5, max_connection_age_grace_s=1)))
    proxy = await proxy_to(gw.running.port)
    async with Endpoint(proxy.address).channel() as ch:
        stub = gateway_pb2_grpc.MoAGatewayStub(ch)
        await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
        await asyncio.sleep(1.0)   # past the age (+10 % jitter): GOAWAY sent, the next call reconnects
        await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert proxy.connections >= 2   # behind a Service, the second connection may reach another replica


async def test_batch_stream_over_many_connection_ages_loses_nothing(gw_emulators, gateway_factory, proxy_to):
    """A batch stream older than the age ends itself (held items finished), one cut at age + grace ends
    UNAVAILABLE "max connection age": either way the window driver resends what got no result, every item
    is answered exactly once, over several connections."""
    emu = await gw_emulators({"a": {"ttft_s": 0.3}, "agg": {"ttft_s": 0.3}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        max_connection_age_s=0.7, max_connection_age_grace_s=0.5)))
    proxy = await proxy_to(gw.running.port)
    got, calls = await run_batch(Endpoint(proxy.address), 16, window=3)
    assert all(res.WhichOneof("result") == "response" for res in got.values()), got
    assert sorted(got) == sorted(f"r{i}" for i in range(16))   # each once (run_batch checks)
    assert calls >= 2 and proxy.connections >= 2, (calls, proxy.connections)
    assert gw.running.guard.limiter.in_flight == 0


async def test_a_batch_stream_that_reaches_the_age_ends_itself_and_wastes_no_work(gw_emulators, gateway_factory):
    """With a grace longer than an item, the stream's own end at the age (held items answered, then
    UNAVAILABLE) always comes before the connection's cut: no item is generated twice."""
    emu = await gw_emulators({"a": {"ttft_s": 0.2}, "agg": {"ttft_s": 0.2}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        max_connection_age_s=0.6, max_connection_age_grace_s=5)))
    got, calls = await run_batch(Endpoint(gw.address), 12, window=2)
    assert sorted(got) == sorted(f"r{i}" for i in range(12)) and calls >= 2
    assert emu.stats.requests == 2 * 12   # one proposer + one aggregator request per item, none repeated


async def test_an_annotate_stream_reaching_the_age_is_resent_and_loses_nothing(judge_emulator, annotator_factory):
    """The annotator's AnnotateStream goes through the same ItemStream and window driver."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris+delay=0.2"}, mode="pointwise",
                                                annotator=transport(max_connection_age_s=0.5,
                                                                    max_connection_age_grace_s=5)))
    reqs = [judge_request(["Paris.", "Lyon."], id=f"r{i}") for i in range(10)]
    got, calls = await run_batch(Endpoint(stub.server.address), 10, window=2,
                                 method=lambda ch: annotator_pb2_grpc.AnnotatorStub(ch).AnnotateStream, reqs=reqs)
    assert sorted(got) == sorted(f"r{i}" for i in range(10)) and calls >= 2
    assert all(res.response.chosen_id == "c0" for res in got.values())


async def _watch(channel, name: str = ""):
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name))
    assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
    return call


async def test_idle_stream_with_our_keepalive_is_not_cut(gw_emulators, gateway_factory):
    """Our client pings an idle stream every keepalive_s; a server that allows that rate keeps the stream
    (a Health.Watch with nothing to say for 3 s, 6 pings), and it still carries the next change."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        min_client_ping_interval_s=0.4, keepalive_time_s=0.5, keepalive_timeout_s=1, **NO_AGE)))
    async with Endpoint(gw.address, keepalive_s=0.5, keepalive_timeout_s=1).channel() as ch:
        call = await _watch(ch, "moaa.v1.MoAGateway")
        await asyncio.sleep(3)
        await gw.running.health.set("moaa.v1.MoAGateway", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await asyncio.wait_for(call.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        call.cancel()


async def test_a_client_pinging_faster_than_allowed_is_cut(gw_emulators, gateway_factory):
    """The failure the previous test guards against: the server's policy is stricter than the client's
    pings, and the connection is closed with GOAWAY ENHANCE_YOUR_CALM too_many_pings."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(min_client_ping_interval_s=10, **NO_AGE)))
    async with Endpoint(gw.address, keepalive_s=0.2, keepalive_timeout_s=1).channel() as ch:
        call = await _watch(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), 10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "too many pings" in err.value.details().lower()


async def test_a_lost_gateway_fails_within_keepalive_not_the_deadline(gw_emulators, gateway_factory, proxy_to):
    """The gateway's node is lost (its connection black-holed): the client's call, with a 60 s deadline, fails
    UNAVAILABLE after about keepalive_s + keepalive_timeout_s; the gateway's own keepalive cancels the
    call of the client it no longer hears, freeing its in-flight slot."""
    emu = await gw_emulators({"a": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        min_client_ping_interval_s=0.2, keepalive_time_s=0.5, keepalive_timeout_s=0.5, **NO_AGE)))
    proxy = await proxy_to(gw.running.port)
    limiter = gw.running.guard.limiter
    async with Endpoint(proxy.address, keepalive_s=0.5, keepalive_timeout_s=0.5).channel() as ch:
        call = gateway_pb2_grpc.MoAGatewayStub(ch).Generate(request(), timeout=60)
        assert await wait_for(lambda: limiter.in_flight == 1, 5)
        proxy.blackhole()
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        took = time.monotonic() - t0
        # about 1 s (ping interval and timeout) where the 60 s deadline would hold it; room for a loaded machine
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and took < 6, (err.value, took)
        assert await wait_for(lambda: limiter.in_flight == 0, 6), "the server kept the vanished client's call"


async def test_a_lost_gateway_mid_batch_is_resent_on_a_new_connection(gw_emulators, gateway_factory, proxy_to):
    emu = await gw_emulators({"a": {"ttft_s": 0.2}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(
        min_client_ping_interval_s=0.2, keepalive_time_s=0.5, keepalive_timeout_s=0.5, **NO_AGE)))
    proxy = await proxy_to(gw.running.port)
    ep = Endpoint(proxy.address, keepalive_s=0.5, keepalive_timeout_s=0.5)
    got = []
    t0 = time.monotonic()
    async with ep.channel() as ch:
        stub = gateway_pb2_grpc.MoAGatewayStub(ch)
        async for res in windowed(stub.GenerateBatch, items(8), ep=ep, what="gateway GenerateBatch", window=2):
            got.append(res.id)
            if len(got) == 2:
                proxy.blackhole()   # the pod's node is gone; a new connection reaches a live one
    assert sorted(got) == sorted(f"r{i}" for i in range(8)) and proxy.connections == 2
    assert time.monotonic() - t0 < 15


SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]   # a small receive window


def long_answer(tokens: int = 150_000) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(messages=request().messages)
    req.aggregator_sampling.max_tokens = tokens   # 150,000: MBs of deltas
    return req


async def test_a_generate_stream_client_that_never_reads_is_cut_by_the_write_timeout(gw_emulators, gateway_factory,
                                                                                      caplog):
    """The servicer's write waits inside grpc's transport while the client reads nothing (its keepalive pings
    are still answered); write_timeout_s bounds it: the in-flight slot is free about write_timeout_s after
    the client stopped, and a client that reads again gets what was sent, then UNAVAILABLE saying why."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"context_window": 400_000}},
                                          gateway=transport(write_timeout_s=1, **NO_AGE)))
    limiter = gw.running.guard.limiter
    caplog.set_level("INFO", logger="moaa.rpc")
    async with grpc.aio.insecure_channel(gw.address, options=SMALL_WINDOW) as ch:
        call = gateway_pb2_grpc.MoAGatewayStub(ch).GenerateStream(long_answer(), timeout=60)
        await call.read()   # then nothing for a while
        t0 = time.monotonic()
        assert await wait_for(lambda: limiter.in_flight == 1, 5)
        assert await wait_for(lambda: limiter.in_flight == 0, 10), "the never-reading client still holds its slot"
        # the write timeout and the time to fill the client's window (far from the 60 s deadline), with room
        # for a loaded machine
        assert time.monotonic() - t0 < 1 + 6
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await call.read() is not grpc.aio.EOF:
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "write_timeout_s" in err.value.details()

    def codes():   # the server logs the call once its status was sent (the client may see it first)
        return [r.code for r in caplog.records if getattr(r, "method", "") == "GenerateStream"]
    assert await wait_for(lambda: codes() == ["UNAVAILABLE"], 6), codes()


async def test_a_batch_client_that_never_reads_frees_its_slots_after_the_write_timeout(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"context_window": 400_000}},
                                          gateway=transport(write_timeout_s=1, **NO_AGE)))
    limiter = gw.running.guard.limiter
    async with grpc.aio.insecure_channel(gw.address, options=SMALL_WINDOW) as ch:
        reqs = [gateway_pb2.BatchItem(id=f"r{i}", request=long_answer(30_000)) for i in range(4)]   # over 64 KiB each
        call = gateway_pb2_grpc.MoAGatewayStub(ch).GenerateBatch(iter(reqs), timeout=60)
        assert await wait_for(lambda: limiter.in_flight > 0, 5)
        assert await wait_for(lambda: limiter.in_flight == 0, 10), "a client that reads nothing holds its slots"
        call.cancel()


async def test_without_a_write_timeout_the_connection_age_still_bounds_a_never_reading_client(gw_emulators,
                                                                                              gateway_factory):
    """write_timeout_s: null: the connection's age + grace ends the call (cancelled, its slot freed) within
    max_connection_age_s * 1.1 + grace."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"context_window": 400_000}},
                                          gateway=transport(max_connection_age_s=1, max_connection_age_grace_s=1,
                                                            write_timeout_s=None)))
    limiter = gw.running.guard.limiter
    async with grpc.aio.insecure_channel(gw.address, options=SMALL_WINDOW) as ch:
        call = gateway_pb2_grpc.MoAGatewayStub(ch).GenerateStream(long_answer(), timeout=60)
        await call.read()   # then never again
        t0 = time.monotonic()
        assert await wait_for(lambda: limiter.in_flight == 1, 5)
        assert await wait_for(lambda: limiter.in_flight == 0, 10), "the never-reading client still holds its slot"
        assert time.monotonic() - t0 < 1 * 1.1 + 1 + 3   # age with jitter + grace, room for a loaded machine
        call.cancel()


async def test_streams_beyond_the_cap_wait_in_the_client(gw_emulators, gateway_factory):
    """max_concurrent_streams=2: two open Health.Watch streams fill the connection; a third call is not
    refused but waits in the client (here until its deadline), and goes through once a stream ends."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway=transport(max_concurrent_streams=2)))
    async with Endpoint(gw.address).channel() as ch:
        stub = gateway_pb2_grpc.MoAGatewayStub(ch)
        await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)   # the server's SETTINGS are known
        watches = [await _watch(ch), await _watch(ch)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        waiting = asyncio.ensure_future(stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        watches[0].cancel()
        assert (await waiting).models
        watches[1].cancel()


async def test_round_robin_over_the_addresses_a_target_resolves_to(gw_emulators, gateway_factory, proxy_to):
    """A target naming several addresses (what dns:/// of a headless Service resolves to): the one channel
    builder balances calls over all of them instead of sticking to the first, and one that refuses
    connections (a pod gone) fails no call."""
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    p1, p2 = await proxy_to(gw.running.port), await proxy_to(gw.running.port)
    async with Endpoint(f"ipv4:{p1.address},127.0.0.1:1,{p2.address}").channel() as ch:
        stub = gateway_pb2_grpc.MoAGatewayStub(ch)
        await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
        await asyncio.sleep(0.2)
        before = p1.sent, p2.sent
        for _ in range(6):
            await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert p1.connections == 1 and p2.connections == 1
    assert p1.sent > before[0] and p2.sent > before[1]   # calls went over both
