"""The grpc.aio `Annotator` servicer: thin, it validates, calls the engine and converts errors."""
from __future__ import annotations

from moaa.services.backend.limits import Admission
from moaa.services.common.logs import item_request_id, request_id_var
from moaa.services.common.rpc import guarded, time_remaining
from moaa.services.common.stream import ItemStream
from moaa.services.config import MoaaConfig
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2

from .engine import AnnotationEngine
from .validation import build_job


def _stream_error(request, code: str, message: str) -> annotator_pb2.AnnotateResult:
    return annotator_pb2.AnnotateResult(id=request.id, error=common_pb2.ErrorDetail(code=code, message=message))


class AnnotatorServicer(annotator_pb2_grpc.AnnotatorServicer):
    def __init__(self, config: MoaaConfig, engine: AnnotationEngine, guard):
        self.config = config
        self.server_cfg = config.annotator
        self.engine = engine
        self.guard = guard
        self.streams: set[ItemStream] = guard.streams  # open AnnotateStream streams
        self.admission = Admission(engine.pool)
        guard.metrics.watch_backends(engine.pool)

    @guarded
    async def Annotate(self, request, context, rid):
        job = build_job(request, self.config, self.server_cfg, rid)
        return await self.engine.annotate(job, timeout=time_remaining(context))

    @guarded
    async def ListEnsembles(self, request, context, rid):
        return annotator_pb2.ListEnsemblesResponse(
            ensembles=[annotator_pb2.EnsembleInfo(name=n, judges=[j.name for j in e.judges], mode=e.mode,
                                                  aggregator=e.aggregator.name if e.aggregator else "",
                                                  combine=e.combine)
                       for n, e in self.config.ensembles.items()],
            default_ensemble=self.config.default_name("ensemble"))

    async def _stream_item(self, request, rid: str) -> annotator_pb2.AnnotateResult:
        token = request_id_var.set(item_request_id(request.request_id, rid, request.id))
        try:
            job = build_job(request, self.config, self.server_cfg, request_id_var.get())
            return annotator_pb2.AnnotateResult(id=request.id, response=await self.engine.annotate(job))
        finally:
            request_id_var.reset(token)

    async def _admit(self, request, spawn) -> None:
        """By the free capacity of the ensemble's judges (first phase) and aggregator judge (later)."""
        try:
            _, ens = self.config.ensemble(request.ensemble or None)
        except LookupError:  # no such ensemble: build_job answers INVALID_ARGUMENT at once
            spawn()
            return
        later = {ens.aggregator.model} if ens.aggregator else set()
        await self.admission.admit({j.model for j in ens.judges}, later, spawn)

    @guarded
    async def AnnotateStream(self, request_iterator, context, rid):
        """Items through the one bounded stream (services/common/stream.py)."""
        stream = ItemStream(lambda request: self._stream_item(request, rid), _stream_error, window=self.server_cfg.batch_window,
                            limiter=self.guard.limiter, live=self.streams, admit=self._admit,
                            item_id=lambda request: request.id, limit=self.guard.request_limit,
                            max_age_s=self.guard.stream_age_s)
        await stream.serve(request_iterator, self.guard.writer(context))
