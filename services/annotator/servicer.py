"""The grpc.aio `Annotator` servicer: thin, it validates, calls the engine and converts errors."""
from __future__ import annotations

import asyncio
import logging

import grpc

from moaa.services.common.errors import RpcError
from moaa.services.common.rpc import guarded, status_of, time_remaining
from moaa.services.common.validation import check_item_id
from moaa.services.config import MoaaConfig
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2

from .engine import AnnotationEngine
from .validation import build_job

log = logging.getLogger("moaa.annotator")


class AnnotatorServicer(annotator_pb2_grpc.AnnotatorServicer):
    def __init__(self, config: MoaaConfig, engine: AnnotationEngine, guard):
        self.config = config
        self.server_cfg = config.annotator
        self.engine = engine
        self.guard = guard

    @guarded
    async def Annotate(self, request, context, rid):
        job = build_job(request, self.config, self.server_cfg, rid)
        return await self.engine.annotate(job, timeout=time_remaining(context))

    async def _one(self, request, seen: set[str]) -> annotator_pb2.AnnotateResult:
        """One stream item; its errors go into the result, the stream goes on."""
        try:
            check_item_id(request.id, seen)
            job = build_job(request, self.config, self.server_cfg)
            return annotator_pb2.AnnotateResult(id=request.id, response=await self.engine.annotate(job))
        except asyncio.CancelledError:
            raise
        except RpcError as err:
            code, msg = err.code.name, str(err)
        except LookupError as err:
            code, msg = "INVALID_ARGUMENT", str(err.args[0] if err.args else err)
        except Exception as err:  # noqa: BLE001 - one bad item must not end the stream
            log.exception("annotating %s failed", request.id)
            status, msg = status_of(err)
            code = status.name
        return annotator_pb2.AnnotateResult(id=request.id, error=common_pb2.ErrorDetail(code=code, message=msg))

    @guarded
    async def AnnotateStream(self, request_iterator, context, rid):
        """At most `batch_window` items in flight: the next request is read only when a slot is free,
        so a fast client is held back by gRPC flow control instead of filling memory."""
        window = asyncio.Semaphore(self.server_cfg.batch_window)
        results: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        reading_done = object()
        seen: set[str] = set()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            window.release()
            if not task.cancelled():
                results.put_nowait(task.result())

        async def reader() -> None:
            async for request in request_iterator:
                await window.acquire()
                task = asyncio.create_task(self._one(request, seen))
                tasks.add(task)
                task.add_done_callback(finished)
            results.put_nowait(reading_done)

        read_task = asyncio.create_task(reader())
        done_reading = False
        try:
            while not (done_reading and not tasks and results.empty()):
                getter = asyncio.ensure_future(results.get())
                await asyncio.wait({getter, read_task} if not done_reading else {getter},
                                   return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    if read_task.done() and read_task.exception() is not None:
                        raise read_task.exception()
                    continue
                item = getter.result()
                if item is reading_done:
                    done_reading = True
                    continue
                yield item
        finally:
            read_task.cancel()
            for task in list(tasks):
                task.cancel()
