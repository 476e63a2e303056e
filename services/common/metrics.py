"""Prometheus metrics shared by the gateway and the annotator, served on an HTTP port.

One set of collectors per process (prometheus-client's default registry), labelled by `service`, so
several servers in one process (tests) share them without clashing.
"""
from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# transport: "grpc" or "http" (the gateway's OpenAI-compatible door); codes are gRPC status names for both
RPC_CALLS = Counter("moaa_rpc_calls", "calls finished, by status code", ["service", "method", "code", "transport"])
RPC_ERRORS = Counter("moaa_rpc_errors", "calls that ended with a non-OK code", ["service", "method", "code", "transport"])
RPC_LATENCY = Histogram("moaa_rpc_latency_seconds", "call latency", ["service", "method", "transport"],
                        buckets=_LATENCY_BUCKETS)
IN_FLIGHT = Gauge("moaa_rpc_in_flight", "work in flight: unary calls plus items of request streams", ["service"])
IN_FLIGHT_HIGH = Gauge("moaa_rpc_in_flight_high_water", "most work ever in flight at once (bounded by max_in_flight)",
                       ["service"])
IN_FLIGHT_LIMIT = Gauge("moaa_rpc_in_flight_limit", "max_in_flight: the bound on work in flight", ["service"])
BACKEND_QUEUED = Gauge("moaa_backend_queued", "requests waiting for a backend slot (bounded by max_queued)",
                       ["service", "model"])
BACKEND_IN_FLIGHT = Gauge("moaa_backend_in_flight", "requests sent to a backend and not yet answered",
                          ["service", "model"])
BACKEND_UP = Gauge("moaa_backend_up", "1 while a replica of the backend is reachable (probes pass, circuit not open)",
                   ["service", "model"])
STAGE_LATENCY = Histogram("moaa_stage_latency_seconds", "latency per stage of a call (layer N, aggregator, ...)",
                          ["service", "stage"], buckets=_LATENCY_BUCKETS)
BACKEND_LATENCY = Histogram("moaa_backend_latency_seconds", "backend request latency", ["service", "model", "outcome"],
                            buckets=_LATENCY_BUCKETS)
BACKEND_ERRORS = Counter("moaa_backend_errors", "backend request failures by cause", ["service", "model", "cause"])
TOKENS = Counter("moaa_tokens", "tokens reported by backends", ["service", "model", "kind"])


class Metrics:
    """The collectors bound to one service name."""

    def __init__(self, service: str):
        self.service = service
        self.in_flight = IN_FLIGHT.labels(service)
        self.in_flight_high = IN_FLIGHT_HIGH.labels(service)
        self.in_flight_limit = IN_FLIGHT_LIMIT.labels(service)
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels):
        # labels() takes a lock and builds a key each time; calls hit the same few children
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.service, *labels)
        return child

    def watch_backends(self, pool) -> None:
        """Per-backend queue depth and requests in flight, read from the pool at each scrape."""
        for name in pool.names:
            client = pool.client(name)
            BACKEND_QUEUED.labels(self.service, name).set_function(lambda c=client: c.queued)
            BACKEND_IN_FLIGHT.labels(self.service, name).set_function(
                lambda c=client: sum(r.in_flight for r in c.replicas.replicas))
            BACKEND_UP.labels(self.service, name).set_function(lambda n=name: float(pool.reachable(n)))

    def call_done(self, method: str, code: str, seconds: float, transport: str = "grpc") -> None:
        self._child(RPC_CALLS, method, code, transport).inc()
        if code != "OK":
            self._child(RPC_ERRORS, method, code, transport).inc()
        self._child(RPC_LATENCY, method, transport).observe(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        self._child(STAGE_LATENCY, stage).observe(seconds)

    def backend(self, model: str, seconds: float, cause: str | None = None) -> None:
        self._child(BACKEND_LATENCY, model, "ok" if cause is None else "error").observe(seconds)
        if cause is not None:
            self._child(BACKEND_ERRORS, model, cause).inc()

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt:
            self._child(TOKENS, model, "prompt").inc(prompt)
        if completion:
            self._child(TOKENS, model, "completion").inc(completion)


def serve_metrics(port: int | None, host: str = "0.0.0.0"):
    """Start the /metrics HTTP server (a daemon thread); returns (server, bound port) or (None, None)."""
    if port is None:
        return None, None
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return server, bound
