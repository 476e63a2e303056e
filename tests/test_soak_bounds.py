"""Long-running servers do not grow: after N calls of a kind (abandoned streams, faults, new request ids)
the server's own structures are back at their baseline. Each test drives a few dozen real calls through
real servers over the emulator and asserts on the structure itself (benchmarks/soak.py is the long run)."""
from __future__ import annotations

import asyncio

from moaa.v1 import gateway_pb2
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.waiting import wait_for

SLOWISH = {"ttft_s": 0.05}  # results come apart in time, as from real models


async def test_abandoned_batch_streams_leave_no_open_stream_nor_slot(gw_emulators, gateway_factory):
    """A client that hangs up on GenerateBatch as its last results go out cancels the call while the
    stream cleans up; the stream must still leave the server's set of open streams and give back its
    in-flight slots (it stayed there for good: ~1 in 3 abandoned streams, each kept forever)."""
    emu = await gw_emulators({"a": SLOWISH, "b": SLOWISH, "agg": SLOWISH})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    guard = gw.running.guard
    for i in range(40):
        items = [gateway_pb2.BatchItem(id=f"{i}-{k}", request=request(f"q {i} {k}")) for k in range(3)]
        call = gw.stub.GenerateBatch(iter(items), timeout=20)
        async for _ in call:
            call.cancel()  # abandoned after its first result
            break
    assert await wait_for(lambda: not guard.streams and guard.limiter.in_flight == 0, timeout=5), (
        f"{len(guard.streams)} of 40 abandoned streams still open, {guard.limiter.in_flight} slots held")
