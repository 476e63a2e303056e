"""gRPC health checking (grpc.health.v1) for every moaa server: per service name and overall ("").

grpcio-health-checking's asyncio servicer keeps every Watch stream open forever, even after
`enter_graceful_shutdown()`; grpc.aio's `server.stop(grace)` then waits the whole grace for them, so one
client watching health (Envoy, gRPC's client-side health checking) held every idle pod's shutdown for
`shutdown_grace_s`. Here a Watch sends NOT_SERVING when shutdown starts and then ends.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self.closing = False

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request, context):
        """Every service's status (grpc.health.v1's List, which the base class leaves unimplemented: a
        client that asked got UNIMPLEMENTED and the server logged a traceback)."""
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._status.items()})

    async def Watch(self, request, context):
        last = None
        while True:
            async with self._changed:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                if status == last and not self.closing:
                    await self._changed.wait()
                    continue
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self.closing:
                return  # the watcher has NOT_SERVING; the stream must not hold the server's drain

    async def set(self, service: str, status: int) -> None:
        """Set one service's status; ignored once shutdown started (it stays NOT_SERVING)."""
        if not self.closing:
            await self._set(service, status)

    async def close(self) -> None:
        """Shutdown: every service NOT_SERVING for good, and Watch streams end after saying so."""
        for service in list(self._status):
            await self._set(service, NOT_SERVING)
        self.closing = True
        async with self._changed:
            self._changed.notify_all()

    async def _set(self, service: str, status: int) -> None:
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()


async def follow(health: Health, service: str, outage: Callable[[], str | None], log: logging.Logger,
                 interval: float = 1.0) -> None:
    """Keep `service` NOT_SERVING while `outage()` says why it cannot serve (its backends unreachable),
    SERVING otherwise, with a log line at each change; runs until cancelled or shutdown. The overall
    status ("", what kubelet probes) is left alone: restarting the process would not bring a backend back."""
    serving = True
    while not health.closing:
        why = outage()
        if (why is None) != serving:
            serving = why is None
            if serving:
                log.info("backends reachable again: %s SERVING", service)
            else:
                log.warning("backend outage: %s NOT_SERVING (%s)", service, why)
            await health.set(service, SERVING if serving else NOT_SERVING)
        await asyncio.sleep(interval)
