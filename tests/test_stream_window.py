"""Slow readers of the two batch streams (GenerateBatch, AnnotateStream): a client that sends many items
and reads nothing makes the server stop reading requests; at most `batch_window` items are held (in
flight or waiting to be written) and the results waiting in memory stay within the window. Counts are
read from the server's own stream objects, not inferred from timing. Real servers, real emulators."""
from __future__ import annotations

import grpc

from moaa.v1 import annotator_pb2_grpc, common_pb2, gateway_pb2
from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as annotate_request
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.waiting import wait_for

WINDOW = 4
ITEMS = 300
# A small HTTP/2 stream window on the client (and no BDP growth) so that the transport holds few results:
# what is not read stays on the server, where the window must bound it.
SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 4096)]


async def _stalls_then_finishes(call, live: set, limiter, ids: set[str]) -> None:
    """The client reads nothing until the server has stopped; then everything arrives."""
    assert await wait_for(lambda: len(live) == 1, timeout=10)
    stream = next(iter(live))
    # stopped: every held item has finished and none of them can be written (the reader does not read)
    assert await wait_for(lambda: stream.held == WINDOW and stream.running == 0, timeout=30), vars(stream)
    read_then = stream.read
    assert not await wait_for(lambda: stream.read != read_then, timeout=0.5)  # and it stays stopped
    assert stream.read < ITEMS // 2, f"the server read {stream.read} of {ITEMS} requests nobody reads results of"
    assert stream.read - stream.written <= WINDOW
    assert stream.max_held <= WINDOW and stream.max_queued <= WINDOW
    assert limiter.in_flight == WINDOW and limiter.high_water <= WINDOW
    got = set()
    while (res := await call.read()) is not grpc.aio.EOF:
        assert res.WhichOneof("result") == "response", res
        got.add(res.id)
    assert got == ids
    assert stream.max_held <= WINDOW and stream.max_queued <= WINDOW
    assert limiter.in_flight == 0 and not live


async def test_generate_batch_slow_reader(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {}, "agg": {}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"batch_window": WINDOW}),
                               channel_factory=lambda port: grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                                                      options=SLOW_READER))
    s = common_pb2.SamplingParams(max_tokens=200)
    items = [gateway_pb2.BatchItem(id=str(i), request=request(f"q{i}", proposer_sampling=s, aggregator_sampling=s))
             for i in range(ITEMS)]
    call = gw.stub.GenerateBatch(iter(items), timeout=120)
    servicer = gw.running.servicer
    await _stalls_then_finishes(call, servicer.streams, gw.running.guard.limiter, {it.id for it in items})
    assert emu.stats.requests == 2 * ITEMS


async def test_annotate_stream_slow_reader(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise",
                                                combine="mean", annotator={"batch_window": WINDOW}))
    running = stub.server
    async with grpc.aio.insecure_channel(running.address, options=SLOW_READER) as channel:
        slow = annotator_pb2_grpc.AnnotatorStub(channel)
        items = [annotate_request(["Paris is the capital of France.", "Bananas are yellow."], id=f"r{i}")
                 for i in range(ITEMS)]
        call = slow.AnnotateStream(iter(items), timeout=120)
        await _stalls_then_finishes(call, running.servicer.streams, running.guard.limiter, {it.id for it in items})


# -- the helper itself: error mapping, cancellation, fairness between streams ---------------------------

async def _requests(n: int, prefix: str = ""):
    for i in range(n):
        yield f"{prefix}{i}"


def _failed(req, code: str, message: str):
    return (req, code, message)


async def test_item_errors_are_mapped_by_status_of():
    from moaa.errors import UserError
    from moaa.services.common.errors import Unavailable
    from moaa.services.common.limiter import InFlightLimiter
    from moaa.services.common.stream import ItemStream

    errors = {"0": UserError("bad setting x: use y"), "1": KeyError("unknown model 'm'"),
              "2": Unavailable("judge down"), "3": RuntimeError("boom")}

    async def handle(req):
        if req in errors:
            raise errors[req]
        return (req, "OK", "")

    out = []

    async def write(res):
        out.append(res)

    limiter = InFlightLimiter(8)
    await ItemStream(handle, _failed, window=2, limiter=limiter).serve(_requests(5), write)
    codes = {req: code for req, code, _ in out}
    assert codes == {"0": "INVALID_ARGUMENT", "1": "INVALID_ARGUMENT", "2": "UNAVAILABLE", "3": "INTERNAL",
                     "4": "OK"}
    assert dict((r, m) for r, _, m in out)["1"] == "unknown model 'm'"
    assert limiter.in_flight == 0 and limiter.high_water <= 2


async def test_cancelled_stream_awaits_its_items_and_frees_their_slots():
    import asyncio

    from moaa.services.common.limiter import InFlightLimiter
    from moaa.services.common.stream import ItemStream

    started, finished = [], []

    async def handle(req):
        started.append(req)
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # cleanup that takes a moment (closing a backend stream)
            finished.append(req)

    async def write(res):
        raise AssertionError("nothing finishes")

    limiter = InFlightLimiter(3)
    task = asyncio.create_task(ItemStream(handle, _failed, window=5, limiter=limiter).serve(_requests(100), write))
    assert await wait_for(lambda: len(started) == 3)  # the global bound (3) is below the window (5)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert sorted(finished) == sorted(started) and limiter.in_flight == 0 and limiter.waiting == 0


async def test_streams_share_the_global_bound_in_turns():
    import asyncio

    from moaa.services.common.limiter import InFlightLimiter
    from moaa.services.common.stream import ItemStream

    admitted = []

    async def handle(req):
        admitted.append(req[0])
        await asyncio.sleep(0.005)
        return (req, "OK", "")

    async def write(res):
        pass

    limiter = InFlightLimiter(2)
    streams = [ItemStream(handle, _failed, window=8, limiter=limiter) for _ in range(3)]
    await asyncio.gather(*(s.serve(_requests(30, prefix=name), write) for s, name in zip(streams, "abc")))
    assert limiter.high_water == 2 and limiter.in_flight == 0
    # once all three wait, they take turns: no stream gets a second slot while another waits
    tail = admitted[6:-6]
    assert all(len(set(tail[i:i + 3])) == 3 for i in range(len(tail) - 2)), "".join(admitted)
    assert sorted(admitted) == sorted("abc" * 30)
