"""500 concurrent GenerateStream calls against emulators: all complete, memory stays bounded."""
from __future__ import annotations

import asyncio
import gc

from moaa.v1 import common_pb2
from tests.fixtures.gateway import moa_config, request


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _round(stub, n: int, tokens: int) -> list[int]:
    sampling = common_pb2.SamplingParams(max_tokens=tokens)

    async def one(i: int) -> int:
        events = 0
        final = None
        async for ev in stub.GenerateStream(request(f"question {i}", proposer_sampling=sampling,
                                                    aggregator_sampling=sampling), timeout=120):
            events += 1
            if ev.HasField("final"):
                final = ev.final
        assert final is not None and final.text and len(final.layers[0].proposals) == 2
        return events

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_500_concurrent_streams_complete_with_bounded_memory(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {"ttft_s": 0.05}, "b": {"ttft_s": 0.1}, "agg": {"ttft_s": 0.05}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    await _round(gw.stub, 500, 8)  # warm-up: connections, buffers, allocator arenas
    gc.collect()
    before = _rss_mb()
    events = await _round(gw.stub, 500, 8)
    assert len(events) == 500 and min(events) >= 2 + 8 + 1
    gc.collect()
    growth = _rss_mb() - before
    assert growth < 150, f"RSS grew by {growth:.0f} MiB over 500 more calls"
    assert emu.stats.requests == 1000 * 3 and emu.stats.disconnects == 0
    assert gw.running.guard.limiter.in_flight == 0
