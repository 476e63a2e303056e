"""Overload: the global bound on work in flight (max_in_flight counts every item of every stream and each
unary call) and the bounded queue per backend, on real servers over the emulator.

The acceptance run starts the gateway as its own process (`moaa gateway serve`), so that its RSS is the
gateway's alone (psutil on that process), and reads the in-flight count from its metrics endpoint.
"""
from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import aiohttp
import grpc
import psutil
import pytest
import yaml

from moaa.services.backend import BackendError
from moaa.services.config import BackendConfig
from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.waiting import wait_for

BOUND = 8  # max_in_flight of the gateway under test: far below 50 streams x batch_window 64
STREAMS, ITEMS = 50, 100
MAX_QUEUED = 3  # per backend; admission by free capacity keeps the queues below it
# RSS growth allowed over the run, after a warm-up round on the same 50 streams. What the gateway holds is
# bounded by BOUND items (a MoA call's tasks, aiohttp requests, protobufs: tens of KiB each, so < 1 MiB)
# plus per-stream gRPC state that the warm-up already created; measured: under 1 MiB. The same run with
# every item admitted at once (max_in_flight 4000, so 50 streams x batch_window 64 = 3200 items in flight,
# as before items were counted, and before admission by backend capacity) grew the gateway by 48 MiB on the
# machine this was written on. 16 MiB is
# well clear of allocator noise and well below what an unbounded gateway costs.
RSS_GROWTH_MIB = 16


def _metric(text: str, name: str, labels: str = 'service="gateway"') -> float | None:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def _run_streams(stub, streams: int, items: int, prefix: str) -> dict[str, list]:
    """Each stream sends `items` items and reads every answer; returns results and errors by id."""
    sampling = common_pb2.SamplingParams(max_tokens=4)

    async def one(s: int):
        reqs = [gateway_pb2.BatchItem(id=f"{prefix}{s}-{i}", request=request(f"q {s} {i}", proposer_sampling=sampling,
                                                                             aggregator_sampling=sampling))
                for i in range(items)]
        return [res async for res in stub.GenerateBatch(iter(reqs), timeout=120)]

    out: dict[str, list] = {"ok": [], "error": []}
    for results in await asyncio.gather(*(one(s) for s in range(streams))):
        for res in results:
            out["ok" if res.WhichOneof("result") == "response" else "error"].append(res)
    return out


async def test_overload_50_streams_of_100_items(gw_emulators, tmp_path, unused_tcp_port_factory):
    emu = await gw_emulators({"a": {"error_rates": {500: 0.05}, "seed": 7}})  # some items fail after retry
    port, metrics_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    limits = {"max_concurrency": 2, "max_queued": MAX_QUEUED}
    cfg = moa_config(emu.url, ["a"], backends={"a": limits, "agg": limits},
                     gateway={"port": port, "metrics_port": metrics_port, "max_in_flight": BOUND})
    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "gateway.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    samples: list[tuple[float, float, float, float]] = []  # in flight, high water, queued a, queued agg
    stop = asyncio.Event()

    async def sample_metrics(session):
        while not stop.is_set():
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                text = await resp.text()
            samples.append((_metric(text, "moaa_rpc_in_flight"), _metric(text, "moaa_rpc_in_flight_high_water"),
                            _metric(text, "moaa_backend_queued", 'model="a",service="gateway"'),
                            _metric(text, "moaa_backend_queued", 'model="agg",service="gateway"')))
            await asyncio.sleep(0.05)

    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert f"listening on 127.0.0.1:{port}" in line, line
        gateway = psutil.Process(proc.pid)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, aiohttp.ClientSession() as session:
            stub = gateway_pb2_grpc.MoAGatewayStub(channel)
            warm = await _run_streams(stub, STREAMS, 4, "w")  # connections, buffers, allocator arenas
            assert len(warm["ok"]) + len(warm["error"]) == STREAMS * 4
            rss_before = gateway.memory_info().rss
            sampler = asyncio.create_task(sample_metrics(session))
            t0 = time.monotonic()
            out = await _run_streams(stub, STREAMS, ITEMS, "r")
            elapsed = time.monotonic() - t0
            stop.set()
            await sampler
            rss_growth = (gateway.memory_info().rss - rss_before) / 2**20
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                final = await resp.text()
    finally:
        proc.kill()
        proc.wait()
        log.close()
    # every item ends in a result or a typed error, each id once
    ids = sorted(r.id for r in out["ok"] + out["error"])
    assert ids == sorted(f"r{s}-{i}" for s in range(STREAMS) for i in range(ITEMS))
    assert out["ok"], "no item succeeded"
    for err in out["error"]:
        assert err.error.code == "UNAVAILABLE" and "failed backends: a " in err.error.message, err
        assert "http_5xx" in err.error.message or f"max_queued={MAX_QUEUED}" in err.error.message, err
    # the bound held at every sample and over the whole run (high-water gauge)
    assert len(samples) >= 5, samples
    assert max(s[0] for s in samples) <= BOUND and max(s[1] for s in samples) <= BOUND, samples
    assert _metric(final, "moaa_rpc_in_flight_high_water") == BOUND  # it was reached: the bound did the work
    assert _metric(final, "moaa_rpc_in_flight") == 0
    assert max(max(s[2], s[3]) for s in samples) <= MAX_QUEUED
    assert rss_growth < RSS_GROWTH_MIB, f"gateway RSS grew by {rss_growth:.1f} MiB"
    print(f"overload: {len(out['ok'])} results, {len(out['error'])} typed errors in {elapsed:.1f} s; "
          f"gateway RSS growth {rss_growth:.1f} MiB; {len(samples)} metric samples")


async def test_unary_call_beyond_the_bound_is_resource_exhausted_while_stream_items_wait(gw_emulators,
                                                                                       gateway_factory):
    emu = await gw_emulators({"a": {"stall_before_headers": True}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"max_in_flight": 2, "batch_window": 8}))
    items = [gateway_pb2.BatchItem(id=str(i), request=request(f"q{i}")) for i in range(5)]
    call = gw.stub.GenerateBatch(iter(items), timeout=30)
    limiter = gw.running.guard.limiter
    assert await wait_for(lambda: limiter.in_flight == 2 and limiter.waiting == 1, timeout=10)
    # two items reached the backend; the third waits for capacity, it was not refused
    assert await wait_for(lambda: emu.stats.in_flight == 2, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_in_flight=2" in err.value.details() and "batch stream" in err.value.details()
    call.cancel()
    assert await wait_for(lambda: limiter.in_flight == 0 and limiter.waiting == 0, timeout=10)


async def test_backend_queue_full_is_a_typed_error(emulator_factory, pool_of):
    emu = await emulator_factory(profiles={"slow": {"ttft_s": 0.5}})
    pool = await pool_of({"slow": BackendConfig(urls=[emu.url], max_concurrency=1, max_queued=2)})
    client = pool.client("slow")
    tasks = [asyncio.create_task(client.chat([{"role": "user", "content": f"q{i}"}])) for i in range(5)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    full = [r for r in results if isinstance(r, BackendError)]
    assert len(full) == 2 and all(e.cause == "queue_full" and not e.retryable and e.endpoint == "" for e in full), results
    assert "max_queued=2" in str(full[0]) and "raise max_queued" in str(full[0])
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3
    assert client.queued == 0 and emu.stats.requests == 3  # refused before sending anything
