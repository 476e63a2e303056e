"""Building and running a grpc.aio server the same way for every moaa service.

TLS/mTLS and bearer auth from the ServerConfig, the request size cap, gRPC health checking and server
reflection, the Prometheus endpoint, and a graceful shutdown (health NOT_SERVING, refuse new calls,
let calls in flight finish within `shutdown_grace_s`; a second signal cuts that short).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from moaa.errors import UserError
from moaa.services.common.auth import auth_interceptors
from moaa.services.common.decoding import DecodeGuardInterceptor, RequestLimit
from moaa.services.common.health import Health
from moaa.services.common.limiter import InFlightLimiter
from moaa.services.common.metrics import Metrics, serve_metrics
from moaa.services.common.rpc import CallGuard
from moaa.services.common.tls import server_credentials
from moaa.services.config import ServerConfig

log = logging.getLogger(__name__)


# CPython's default thresholds (700, 10, 10) collect every few hundred allocations. Measured with
# benchmarks/gateway.py at 512 concurrent MoA calls: 60-90 collections of over 2 ms each (up to 180 ms)
# in 17.5 s, which set the p99 added latency (80-180 ms); with these, 7 such collections and a p99 of
# 17-38 ms, at no more CPU. A young generation of 50,000 objects holds a few MB of garbage at most.
GC_THRESHOLDS = (50_000, 100, 1000)
# gRPC's receive limit: a stream item over max_request_bytes but under this is read and refused alone (an
# item error, the stream goes on); one over it still ends its stream at the transport (RESOURCE_EXHAUSTED)
TRANSPORT_MAX_BYTES = 64 * 1024 * 1024


def tune_gc_for_serving() -> None:
    """For a process that from now on only serves: what startup built (modules, config, stubs) is moved out
    of the collector's sight, and collections run far less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass
class RunningServer:
    """A started server and what belongs to it."""

    server: grpc.aio.Server
    port: int
    health: Health
    service_names: list[str]
    guard: CallGuard
    grace_s: float
    metrics_server: object | None = None
    metrics_port: int | None = None
    on_drain: list = field(default_factory=list)   # other doors' graceful stops, run beside gRPC's
    on_stop: list = field(default_factory=list)    # then these, once no call is left
    host: str = "127.0.0.1"
    _stopped: bool = False
    _drains: list = field(default_factory=list)
    _hurried: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ready_line(self, service: str, doors: str = "") -> str:
        """What `moaa SERVICE serve` prints on stdout once it serves: its ports, for scripts and people."""
        return (f"moaa {service} listening on {self.host}:{self.port}{doors}"
                + (f", metrics on :{self.metrics_port}/metrics" if self.metrics_port else ""))

    async def stop(self, grace: float | None = None) -> None:
        """Graceful: NOT_SERVING (health watchers told, their streams ended), every door refuses new calls
        at once, calls in flight get up to the grace, then what the server owns is closed."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.grace_s if grace is None else grace
        await self.health.close()
        for stream in list(self.guard.streams):  # they would take new items for the whole grace
            stream.close("the server is shutting down: resend the items that got no result")
        t0 = time.monotonic()
        if self._hurried:  # a second signal came while health was being closed
            grace = 0
        self._drains = [asyncio.ensure_future(self.server.stop(grace)),
                        *(asyncio.ensure_future(fn()) for fn in self.on_drain)]
        drained = asyncio.gather(*self._drains, return_exceptions=True)
        done, _ = await asyncio.wait({drained}, timeout=grace)
        if not done and self.guard.limiter.in_flight:  # grpc and aiohttp cancel them at the grace, silently
            log.warning("shutdown grace %.0f s passed: cancelling %d items in flight (clients see UNAVAILABLE)",
                        grace, self.guard.limiter.in_flight)
        for res in await drained:
            if isinstance(res, Exception):
                log.warning("draining: %s: %s", type(res).__name__, res)
        log.info("%s in %.1f s", "drained" if done and not self._hurried else "stopped", time.monotonic() - t0)
        for fn in self.on_stop:
            res = fn()
            if asyncio.iscoroutine(res):
                await res
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None

    def hurry(self) -> None:
        """Cut a graceful stop short: calls still in flight are cancelled now (clients see UNAVAILABLE)."""
        self._hurried = True
        for drain in self._drains[1:]:
            drain.cancel()
        asyncio.ensure_future(self.server.stop(0))  # a smaller grace than the pending stop's wins

    async def wait_for_signal(self, ready: str = "") -> int:
        """Print the `ready` line, serve until SIGTERM/SIGINT, then stop gracefully; a second signal stops
        at once. Returns the exit code: 0 after a full drain, 128 + the second signal when it was cut
        short. The process is a server from here on: its garbage collector is tuned for that
        (tune_gc_for_serving)."""
        tune_gc_for_serving()
        loop = asyncio.get_running_loop()
        signals: asyncio.Queue[int] = asyncio.Queue()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, signals.put_nowait, sig)
        if ready:  # only now: whoever reads it may stop us at once, and that must be the graceful stop
            print(ready, flush=True)
        first = await signals.get()
        log.info("%s: shutting down: finishing %d items in flight (grace %.0f s; a second signal stops at once)",
                 signal.Signals(first).name, self.guard.limiter.in_flight, self.grace_s)
        stopping = asyncio.ensure_future(self.stop())
        second = asyncio.ensure_future(signals.get())
        await asyncio.wait({stopping, second}, return_when=asyncio.FIRST_COMPLETED)
        if not second.done():
            second.cancel()
            await stopping
            return 0
        log.warning("second signal (%s): stopping now, cancelling %d items in flight",
                    signal.Signals(second.result()).name, self.guard.limiter.in_flight)
        self.hurry()
        await stopping
        return 128 + second.result()


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection as grpc.reflection.v1alpha and as grpc.reflection.v1, which grpcurl, Postman and
    grpc-js clients ask first (grpcio-reflection serves only v1alpha). v1 is v1alpha's protocol under another
    package name, the same messages and field numbers, so one servicer answers both. v1 is not listed: its
    descriptor is not in our pool, and a client that lists then describes everything would fail on it."""
    servicer = reflection.aio.ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.reflection.v1.ServerReflection", {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def check_free(host: str, port: int | None, setting: str) -> None:
    """A busy port fails the start with one line naming the setting to change, before gRPC (which would
    print its own C-core report and raise a bare RuntimeError) or the metrics server try it."""
    if port is None:
        return
    bare = host.strip("[]")   # port 0 (any free port): the host is still checked
    try:
        socket.getaddrinfo(bare, port)
    except socket.gaierror as err:   # the host, not the port, is wrong
        raise UserError(f"cannot listen on {host}:{port}: host {host!r} does not resolve ({err.strerror}); give "
                        "an address of this machine (the host setting, or --host)") from None
    try:
        with socket.create_server((bare, port), family=socket.AF_INET6 if ":" in bare else socket.AF_INET):
            pass
    except OSError as err:
        why = os.strerror(err.errno) if err.errno else str(err)  # create_server's own text repeats the address
        raise UserError(f"cannot listen on {host}:{port} ({why}): set {setting} to a free port") from None


async def start_server(cfg: ServerConfig, service: str, add_servicers, service_names: list[str]) -> RunningServer:
    """Start a server. `add_servicers(server, guard)` registers the service(s); `service_names` are the
    full names (e.g. 'moaa.v1.MoAGateway') for health and reflection."""
    check_free(cfg.host, cfg.port, f"{service}.port (or --port)")
    check_free(cfg.host, cfg.metrics_port, f"{service}.metrics_port")
    metrics = Metrics(service)
    metrics.in_flight_limit.set(cfg.max_in_flight)
    limit = RequestLimit(cfg.max_request_bytes, f"{service}.max_request_bytes")
    guard = CallGuard(InFlightLimiter(cfg.max_in_flight, metrics.in_flight, metrics.in_flight_high), metrics, limit,
                      stream_age_s=cfg.transport.max_connection_age_s, write_timeout_s=cfg.transport.write_timeout_s)
    options = [
        # the transport's hard cap; max_request_bytes itself is checked per message (decoding.py, stream.py)
        ("grpc.max_receive_message_length", max(cfg.max_request_bytes, TRANSPORT_MAX_BYTES)),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
        *cfg.transport.server_options(),   # connection age, keepalive, streams per connection (transport.py)
    ]
    # undecodable request bytes -> INVALID_ARGUMENT (innermost, so auth's refusals decode safely too)
    interceptors = [*auth_interceptors(cfg.auth, guard), DecodeGuardInterceptor(limit)]
    server = grpc.aio.server(interceptors=interceptors, options=options, maximum_concurrent_rpcs=None,
                             compression=cfg.transport.server_compression())
    add_servicers(server, guard)
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_reflection(server, [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                            reflection.SERVICE_NAME])
    creds = server_credentials(cfg.tls)
    address = f"{cfg.host}:{cfg.port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    await server.start()
    for name in service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    msrv, mport = serve_metrics(cfg.metrics_port, cfg.host)
    log.info("%s listening on %s:%d%s", service, cfg.host, port, " (TLS)" if creds else "")
    return RunningServer(server=server, port=port, health=health_servicer, service_names=service_names, guard=guard,
                         grace_s=cfg.shutdown_grace_s, metrics_server=msrv, metrics_port=mport, host=cfg.host)
