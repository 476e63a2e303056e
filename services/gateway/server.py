"""Building the gateway server: backend pool, servicer, common server plumbing."""
from __future__ import annotations

import asyncio
import logging

from moaa.client.endpoint import Endpoint
from moaa.errors import UserError
from moaa.services.backend import BackendPool
from moaa.services.common.health import follow
from moaa.services.common.server import RunningServer, start_server
from moaa.services.config import MoaaConfig
from moaa.services.gateway.annotation import AnnotatorClient
from moaa.services.gateway.openai.api_router import OpenAIRouter, start_http
from moaa.services.gateway.openai.serving import ChatServing
from moaa.services.gateway.servicer import GatewayServicer
from moaa.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["MoAGateway"].full_name


async def start_gateway(cfg: MoaaConfig, *, probes: bool = True) -> RunningServer:
    """Start the gateway and its backend pool; `RunningServer.stop()` stops both."""
    annotator = annotator_client(cfg)  # reads TLS files: fail before any backend session is open
    pool = BackendPool(cfg.backends, probes=probes)
    await pool.start()
    # load configured tokenizers now (in a thread), not on the first call that needs one
    from moaa.services.gateway.context import counter_for
    for name in sorted({b.tokenizer for b in cfg.backends.values() if b.tokenizer}):
        await asyncio.to_thread(counter_for, name)
    holder = {}

    def add(server, guard):
        holder["servicer"] = GatewayServicer(cfg, pool, guard, annotator)
        gateway_pb2_grpc.add_MoAGatewayServicer_to_server(holder["servicer"], server)

    try:
        running = await start_server(cfg.gateway, "gateway", add, [SERVICE_NAME])
    except BaseException:  # a busy port: close what is open, so the error stays the one line printed
        await pool.close()
        if annotator is not None:
            await annotator.close()
        raise
    running.servicer = holder["servicer"]
    running.http_port = None
    if cfg.gateway.http_port is not None:  # the OpenAI-compatible door, over the same engine and limits
        try:
            router = OpenAIRouter(ChatServing(cfg, running.servicer.engine), running.guard, cfg.gateway)
            runner, running.http_port = await start_http(router, cfg.gateway.host, cfg.gateway.http_port,
                                                         cfg.gateway.shutdown_grace_s)
        except BaseException as err:
            await running.stop(0)
            await pool.close()
            if annotator is not None:
                await annotator.close()
            if isinstance(err, OSError):
                raise UserError(f"cannot serve HTTP on {cfg.gateway.host}:{cfg.gateway.http_port} "
                                f"({err.strerror or err}): set gateway.http_port (or --http-port) to a free port, "
                                "or null to turn HTTP off") from None
            raise
        running.on_drain.append(runner.cleanup)  # the HTTP door stops taking calls with gRPC, drains beside it
    watcher = asyncio.create_task(follow(running.health, SERVICE_NAME, running.servicer.engine.outage, log),
                                  name="gateway backend health")
    running.on_stop.append(watcher.cancel)
    if annotator is not None:
        running.on_stop.append(annotator.close)
    running.on_stop.append(pool.close)
    return running


def annotator_client(cfg: MoaaConfig) -> AnnotatorClient | None:
    """The channel to the annotator; TLS credentials are read now, so a bad path fails at start."""
    if not cfg.annotator_address:
        return None
    tls = cfg.annotator_tls
    return AnnotatorClient(Endpoint(cfg.annotator_address, tls=tls.on, tls_ca=tls.ca_file, cert_file=tls.cert_file,
                                    key_file=tls.key_file, server_name=tls.server_name))


async def serve(cfg: MoaaConfig) -> int:
    """Run until SIGTERM/SIGINT, then finish calls in flight and stop; returns the exit code."""
    running = await start_gateway(cfg)
    doors = f", OpenAI-compatible HTTP on :{running.http_port}/v1" if running.http_port else ""
    return await running.wait_for_signal(running.ready_line("gateway", doors))
