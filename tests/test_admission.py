"""Batch streams admit items by the backends' free capacity (issue: keep every backend busy): the window
is only an upper bound; an item starts when its proposers have a free slot, and the aggregator never has
more than one round of its capacity waiting. Real gateway over the emulator; counts read from the
gateway's own backend clients and stream objects while the stream runs."""
from __future__ import annotations

import asyncio

from moaa.v1 import common_pb2, gateway_pb2
from tests.fixtures.gateway import moa_config, request

SLOTS = 4  # max_concurrency per backend (one replica each)


async def test_generate_batch_admits_by_free_backend_capacity(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {"ttft_s": 0.1}, "agg": {"ttft_s": 0.1}})
    limits = {"max_concurrency": SLOTS}
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"a": limits, "agg": limits},
                                          gateway={"batch_window": 64}))
    pool, servicer = gw.running.servicer.pool, gw.running.servicer
    a, agg = pool.client("a"), pool.client("agg")
    peaks = {"held": 0, "a_queued": 0, "agg_queued": 0, "a_busy": 0, "agg_busy": 0}
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            held = max((s.held for s in servicer.streams), default=0)
            for key, value in (("held", held), ("a_queued", a.queued), ("agg_queued", agg.queued),
                               ("a_busy", a.replicas.replicas[0].in_flight),
                               ("agg_busy", agg.replicas.replicas[0].in_flight)):
                peaks[key] = max(peaks[key], value)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    s = common_pb2.SamplingParams(max_tokens=4)
    items = [gateway_pb2.BatchItem(id=str(i), request=request(f"q{i}", proposer_sampling=s, aggregator_sampling=s))
             for i in range(40)]
    results = [r async for r in gw.stub.GenerateBatch(iter(items), timeout=60)]
    done.set()
    await sampler
    assert sorted(r.id for r in results) == sorted(it.id for it in items)
    assert all(r.WhichOneof("result") == "response" for r in results)
    # both backends were filled, the proposer never had a request waiting, the aggregator at most a round
    assert peaks["a_busy"] == SLOTS and peaks["agg_busy"] == SLOTS, peaks
    assert peaks["a_queued"] == 0 and peaks["agg_queued"] <= SLOTS, peaks
    # so the stream held about what the backends can run, far below its window of 64
    assert SLOTS < peaks["held"] <= 3 * SLOTS + 1, peaks


async def test_annotate_stream_admits_by_free_judge_capacity(judge_emulator, annotator_factory):
    from tests.fixtures.annotator import judge_config
    from tests.fixtures.annotator import request as annotate_request

    cfg = judge_config(judge_emulator.url, {"a": "keyword:paris+delay=0.1"}, mode="pointwise", combine="mean",
                       annotator={"batch_window": 64})
    cfg["backends"]["m-a"]["max_concurrency"] = SLOTS
    stub = await annotator_factory(cfg)
    servicer = stub.server.servicer
    judge = servicer.engine.pool.client("m-a")
    peaks = {"held": 0, "busy": 0}
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            peaks["held"] = max(peaks["held"], max((s.held for s in servicer.streams), default=0))
            peaks["busy"] = max(peaks["busy"], judge.replicas.replicas[0].in_flight)
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    items = [annotate_request(["Paris is the capital of France.", "Bananas are yellow."], id=f"r{i}")
             for i in range(24)]
    results = [r async for r in stub.AnnotateStream(iter(items), timeout=60)]
    done.set()
    await sampler
    assert sorted(r.id for r in results) == sorted(it.id for it in items)
    assert all(r.response.chosen_id == "c0" for r in results)
    assert peaks["busy"] == SLOTS and peaks["held"] <= SLOTS + 1, peaks  # the judge, not the window, decides
