"""Starting the annotator: backend pool, engine, grpc.aio server (shared server builder).

Health: the overall status ("") is SERVING until shutdown (kubelet's liveness and readiness probes ask
it, unauthenticated). The `moaa.v1.Annotator` service status is NOT_SERVING while no ensemble can
decide a prompt because its judge backends are unreachable (probes failing or circuits open), so a
judge outage is visible to a health check without restarting the annotator.
"""
from __future__ import annotations

import asyncio
import logging

from moaa.errors import UserError
from moaa.services.backend import BackendPool
from moaa.services.common.health import follow
from moaa.services.common.server import RunningServer, start_server
from moaa.services.config import MoaaConfig
from moaa.v1 import annotator_pb2, annotator_pb2_grpc

from .engine import AnnotationEngine
from .servicer import AnnotatorServicer
from .templates import TemplateError

SERVICE_NAME = annotator_pb2.DESCRIPTOR.services_by_name["Annotator"].full_name
log = logging.getLogger("moaa.annotator")


async def start_annotator(config: MoaaConfig, *, port: int | None = None, probes: bool = True) -> RunningServer:
    """A running annotator server; `port=0` picks a free port (tests). Stop it with `await server.stop()`."""
    if not config.ensembles:
        raise UserError("the config has no ensembles: add one under `ensembles:` for the annotator to use")
    server_cfg = config.annotator if port is None else config.annotator.model_copy(update={"port": port})
    pool = BackendPool(config.judge_backends(), probes=probes)  # not the recipes' models: no keys, no probes
    try:
        engine = AnnotationEngine(config, pool)
    except TemplateError as err:
        raise UserError(str(err)) from None
    await pool.start()
    holder = {}

    def add(server, guard):
        servicer = holder["servicer"] = AnnotatorServicer(config, engine, guard)
        annotator_pb2_grpc.add_AnnotatorServicer_to_server(servicer, server)

    try:
        running = await start_server(server_cfg, "annotator", add, [SERVICE_NAME])
    except BaseException:
        await pool.close()
        raise
    engine.metrics = running.guard.metrics
    watcher = asyncio.create_task(follow(running.health, SERVICE_NAME, engine.outage, log), name="annotator judge health")
    running.on_stop.append(watcher.cancel)
    running.servicer = holder["servicer"]
    running.on_stop.append(pool.close)
    return running

