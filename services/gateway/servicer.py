"""The MoAGateway gRPC servicer: thin, every call goes through `guarded` and plain async functions."""
from __future__ import annotations

import time

from moaa.services.backend.limits import Admission
from moaa.services.common.convert import models_info_proto
from moaa.services.common.errors import RpcError
from moaa.services.common.logs import item_request_id, request_id_var
from moaa.services.common.rpc import CallGuard, guarded, time_remaining
from moaa.services.common.stream import ItemStream
from moaa.services.config import MoaaConfig
from moaa.services.gateway.engine import MoAEngine
from moaa.services.gateway.plan import make_plan
from moaa.services.gateway.annotation import AnnotatorClient, annotate_moa, check_annotate
from moaa.services.gateway.sample import run_sample
from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def _batch_error(item, code: str, message: str) -> gateway_pb2.BatchResult:
    return gateway_pb2.BatchResult(id=item.id, error=common_pb2.ErrorDetail(code=code, message=message))


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
        self.streams: set[ItemStream] = guard.streams  # open GenerateBatch streams
        self.admission = Admission(pool)
        guard.metrics.watch_backends(pool)

    async def _generate(self, request, rid: str, deadline: float | None, deltas: bool = True, metadata=()):
        started = time.monotonic()
        plan = make_plan(self.cfg, request, rid, self.max_prompt_chars)
        check_annotate(self.cfg, request.annotate, request.ensemble)
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

    async def _batch_item(self, item, rid: str, deadline: float | None, metadata) -> gateway_pb2.BatchResult:
        item_rid = item_request_id(item.request.request_id, rid, item.id)
        token = request_id_var.set(item_rid)
        try:
            async for ev in self._generate(item.request, item_rid, deadline, deltas=False, metadata=metadata):
                if ev.HasField("final"):
                    return gateway_pb2.BatchResult(id=item.id, response=ev.final)
            raise RpcError("the engine ended without a result")
        finally:
            request_id_var.reset(token)

    async def _admit(self, item, spawn) -> None:
        """By the free capacity of the recipe's proposers (first phase) and aggregator (later)."""
        try:
            _, recipe = self.cfg.recipe(item.request.recipe or None)
        except LookupError:  # no such recipe: make_plan answers INVALID_ARGUMENT at once
            spawn()
            return
        await self.admission.admit({a.model for a in recipe.proposers}, {recipe.aggregator.model}, spawn)

    @guarded
    async def GenerateBatch(self, request_iterator, context, rid):
        """Items through the one bounded stream (services/common/stream.py)."""
        deadline, metadata = _deadline(context), context.invocation_metadata() or ()
        stream = ItemStream(lambda item: self._batch_item(item, rid, deadline, metadata), _batch_error,
                            window=self.batch_window, limiter=self.guard.limiter, live=self.streams,
                            admit=self._admit, item_id=lambda item: item.id, limit=self.guard.request_limit,
                            max_age_s=self.guard.stream_age_s)
        await stream.serve(request_iterator, self.guard.writer(context))

    @guarded
    async def Sample(self, request, context, rid):
        return await run_sample(self.pool, self.cfg, request, rid, timeout=time_remaining(context),
                                max_prompt_chars=self.max_prompt_chars, annotator=self.annotator,
                                metadata=context.invocation_metadata() or (), metrics=self.guard.metrics)

    @guarded
    async def ListModels(self, request, context, rid):
        recipes = [gateway_pb2.RecipeInfo(name=n, proposers=[a.model for a in r.proposers],
                                          aggregator=r.aggregator.model, layers=r.layers)
                   for n, r in self.cfg.recipes.items()]
        return gateway_pb2.ListModelsResponse(models=models_info_proto(self.pool.models_info()), recipes=recipes,
                                              default_recipe=self.cfg.default_name("recipe"))
