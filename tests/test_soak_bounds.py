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


async def test_a_stream_cancelled_twice_still_leaves_the_open_set_and_frees_its_slots():
    """The same, made certain: the second cancel lands while the stream waits for its items' clean-up."""
    from moaa.services.common.limiter import InFlightLimiter
    from moaa.services.common.stream import ItemStream

    started = []

    async def handle(req):
        started.append(req)
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.05)  # closing a backend stream takes a moment

    async def requests():
        for i in range(10):
            yield str(i)

    async def write(res):
        raise AssertionError("nothing finishes")

    live, limiter = set(), InFlightLimiter(8)
    stream = ItemStream(handle, lambda req, code, msg: (req, code), window=3, limiter=limiter, live=live)
    task = asyncio.create_task(stream.serve(requests(), write))
    assert await wait_for(lambda: len(started) == 3)
    task.cancel()
    await asyncio.sleep(0.01)  # the stream is now waiting for its items' clean-up
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not live and limiter.in_flight == 0, (live, limiter.in_flight)


async def test_moaa_annotate_holds_the_window_not_the_file(tmp_path, annotator_factory):
    """`moaa annotate` over many rows holds the requests of its window, not one per row of the samples file:
    counted mid-run among the process's live AnnotateRequest messages (client and in-process annotator,
    both with a window of 4). It held every row's request from start to end."""
    import gc
    import json

    from moaa.client.annotate import annotate_file
    from moaa.client.endpoint import Endpoint
    from moaa.services.emulator import Emulator, EmulatorSettings
    from moaa.v1 import annotator_pb2
    from tests.fixtures.annotator import judge_config

    judges = Emulator(EmulatorSettings(judge=True, ttft_s=0.01))
    await judges.start()
    try:
        stub = await annotator_factory(judge_config(judges.url, {"a": "keyword:paris"}, mode="pointwise",
                                                    annotator={"batch_window": 4}))
        rows = 300
        inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
        with inp.open("w") as fh:
            for i in range(rows):
                cands = [{"text": "Bananas are yellow."}, {"text": "Paris is the capital."}]
                fh.write(json.dumps({"id": f"r{i}", "prompt": "Capital of France?", "candidates": cands}) + "\n")
        run = asyncio.create_task(annotate_file(Endpoint(stub.server.address), str(inp), str(out), progress=False,
                                                window=4))
        assert await wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= rows // 3, timeout=60)
        # type(), not isinstance: isinstance reads __class__, which warns on some of torch's objects
        live = sum(type(o) is annotator_pb2.AnnotateRequest for o in gc.get_objects())
        summary = await run
        assert summary["pairs"] == rows
        assert live <= 40, f"{live} AnnotateRequests alive a third into a {rows}-row run with a window of 4"
    finally:
        await judges.stop()


def test_a_store_keeps_one_copy_of_a_failure_message_many_rows_share(tmp_path):
    """An outage fails row after row with the same message (each built anew from the server's answer); the
    pipeline's store keeps the failed ids until the run ends, and kept a copy of the message per row."""
    import tracemalloc

    from moaa.pipeline.store import DatasetStore

    store = DatasetStore(tmp_path / "d", stage="sft_data", fmt="sft").open()
    detail = "all proposers failed: " + "b (http_5xx HTTP 500: Internal Server Error); " * 10
    rows = 2000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(rows):
            store.fail(f"r{i}", f"UNAVAILABLE: {detail}")
        per_row = (tracemalloc.get_traced_memory()[0] - before) / rows
    finally:
        tracemalloc.stop()
    assert len(store.failed) == rows
    assert per_row < len(detail) / 2, f"{per_row:.0f} B held per failed row for a {len(detail)}-character message"
    reopened = DatasetStore(tmp_path / "d", stage="sft_data", fmt="sft").open()
    assert len({id(m) for m in reopened.failed.values()}) == 1   # reading failures.jsonl back: one copy too
