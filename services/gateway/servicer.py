"""The MoAGateway gRPC servicer: thin, every call goes through `guarded` and plain async functions."""
from __future__ import annotations

import asyncio
import time

from moaa.services.common.convert import models_info_proto
from moaa.services.common.errors import RpcError
from moaa.services.common.logs import new_request_id, request_id_var
from moaa.services.common.rpc import CallGuard, status_of, guarded, time_remaining
from moaa.services.config import MoaaConfig
from moaa.services.gateway.engine import MoAEngine
from moaa.services.gateway.plan import make_plan
from moaa.services.gateway.annotation import AnnotatorClient, annotate_moa, check_annotate
from moaa.services.gateway.sample import run_sample
from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

_DONE = object()


def _deadline(context) -> float | None:
    left = time_remaining(context)
    return None if left is None else time.monotonic() + left


class GatewayServicer(gateway_pb2_grpc.MoAGatewayServicer):
    def __init__(self, cfg: MoaaConfig, pool, guard: CallGuard, annotator: AnnotatorClient | None = None):
        self.cfg = cfg
        self.pool = pool
        self.guard = guard
        self.engine = MoAEngine(cfg, pool, guard.metrics)
        self.annotator = annotator
        self.max_prompt_chars = cfg.gateway.max_prompt_chars
        self.batch_window = cfg.gateway.batch_window

    async def _generate(self, request, rid: str, deadline: float | None, deltas: bool = True, metadata=()):
        started = time.monotonic()
        plan = make_plan(self.cfg, request, rid, self.max_prompt_chars)
        if request.annotate:
            check_annotate(self.cfg, request.ensemble)
        async for ev in self.engine.run(plan, deadline, started, deltas=deltas):
            if request.annotate and ev.HasField("final"):
                timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
                await annotate_moa(self.annotator, request, ev.final, timeout=timeout, metadata=metadata)
            yield ev

    @guarded
    async def Generate(self, request, context, rid):
        async for ev in self._generate(request, rid, _deadline(context), deltas=False,
                                       metadata=context.invocation_metadata() or ()):
            if ev.HasField("final"):
                return ev.final
        raise RpcError("the engine ended without a result")

    @guarded
    async def GenerateStream(self, request, context, rid):
        async for ev in self._generate(request, rid, _deadline(context), metadata=context.invocation_metadata() or ()):
            yield ev

    @guarded
    async def GenerateBatch(self, request_iterator, context, rid):
        """At most `batch_window` items in flight; a slot frees only once its result was written, so a
        slow reader stops us reading more requests instead of piling results up in memory."""
        window = asyncio.Semaphore(self.batch_window)
        results: asyncio.Queue = asyncio.Queue()
        deadline = _deadline(context)
        metadata = context.invocation_metadata() or ()
        tasks: set[asyncio.Task] = set()

        async def one(item):
            item_rid = item.request.request_id or (f"{rid}-{item.id}" if item.id else new_request_id())
            token = request_id_var.set(item_rid)
            try:
                resp = None
                async for ev in self._generate(item.request, item_rid, deadline, deltas=False, metadata=metadata):
                    if ev.HasField("final"):
                        resp = ev.final
                results.put_nowait(gateway_pb2.BatchResult(id=item.id, response=resp))
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - one bad item does not end the stream
                code, msg = status_of(err)
                results.put_nowait(gateway_pb2.BatchResult(
                    id=item.id, error=common_pb2.ErrorDetail(code=code.name, message=msg)))
            finally:
                request_id_var.reset(token)

        spawned = 0

        async def reader():
            nonlocal spawned
            try:
                async for item in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(one(item))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    spawned += 1
            finally:
                results.put_nowait(_DONE)

        read_task = asyncio.create_task(reader())
        written, reader_done = 0, False
        try:
            while not (reader_done and written == spawned):
                res = await results.get()
                if res is _DONE:
                    reader_done = True
                    continue
                yield res  # returns once the transport took it: backpressure
                written += 1
                window.release()
            await read_task
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(read_task, *tasks, return_exceptions=True)

    @guarded
    async def Sample(self, request, context, rid):
        return await run_sample(self.pool, self.cfg, request, rid, timeout=time_remaining(context),
                                max_prompt_chars=self.max_prompt_chars, annotator=self.annotator,
                                metadata=context.invocation_metadata() or ())

    @guarded
    async def ListModels(self, request, context, rid):
        recipes = [gateway_pb2.RecipeInfo(name=n, proposers=[a.model for a in r.proposers],
                                          aggregator=r.aggregator.model, layers=r.layers)
                   for n, r in self.cfg.recipes.items()]
        return gateway_pb2.ListModelsResponse(models=models_info_proto(self.pool.models_info()), recipes=recipes)
