"""Replicas of one backend: fewest-in-flight balancing, a circuit breaker, health state."""
from __future__ import annotations

import logging
import time

from moaa.services.backend.config import BackendConfig

from .limits import AdaptiveLimit

log = logging.getLogger("moaa.backend")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Replica:
    """One endpoint. The circuit opens after `failure_threshold` consecutive replica faults; after
    `reset_after_s` one trial request goes through (half-open) and its outcome closes or reopens it."""

    def __init__(self, model: str, url: str, cfg: BackendConfig):
        self.model = model
        self.url = url
        self.limit = AdaptiveLimit(cfg.max_concurrency)
        self._threshold = cfg.circuit.failure_threshold
        self._reset_after = cfg.circuit.reset_after_s
        self.failures = 0
        self._state = CLOSED
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.healthy = True
        self.last_error = ""
        self.last_probe_latency_s = 0.0
        self.last_progress = time.monotonic()  # last byte from a live request or a probe

    @property
    def in_flight(self) -> int:
        return self.limit.in_flight

    @property
    def load(self) -> int:
        return self.limit.in_flight + self.limit.waiting

    @property
    def circuit(self) -> str:
        if self._state == OPEN and time.monotonic() - self._opened_at >= self._reset_after:
            return HALF_OPEN
        return self._state

    def available(self) -> bool:
        """May take a request now (a half-open circuit takes one trial at a time)."""
        state = self.circuit
        return state == CLOSED or (state == HALF_OPEN and not self._trial_in_flight)

    def begin(self) -> bool:
        """Marks the start of a request; returns True when it is the half-open trial."""
        if self.circuit == HALF_OPEN:
            self._trial_in_flight = True
            return True
        return False

    def end_trial(self) -> None:
        self._trial_in_flight = False

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def record_success(self) -> None:
        if self._state != CLOSED:
            log.info("backend %s replica %s: circuit closed", self.model, self.url)
        self.failures = 0
        self._state = CLOSED
        self.healthy = True
        self.progress()

    def record_failure(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        state = self.circuit
        if state == HALF_OPEN:  # the trial failed: open again, the outage already logged when it opened
            self._state = OPEN
            self._opened_at = time.monotonic()
            log.info("backend %s replica %s: half-open trial request failed, circuit open again for %gs (%s)",
                     self.model, self.url, self._reset_after, reason)
        elif state == CLOSED and self.failures >= self._threshold:
            self._state = OPEN
            self._opened_at = time.monotonic()
            log.warning("backend %s replica %s: circuit open after %d consecutive failures (%s)",
                        self.model, self.url, self.failures, reason)

    def info(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "circuit": self.circuit, "in_flight": self.in_flight,
                "last_error": self.last_error, "last_probe_latency_s": self.last_probe_latency_s}


class ReplicaSet:
    def __init__(self, model: str, cfg: BackendConfig):
        self.replicas = [Replica(model, url, cfg) for url in cfg.urls]
        self._turn = 0  # rotates the start so that ties do not always go to the first replica

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        """The available replica with the fewest requests in flight, healthy ones first, replicas not
        yet tried in this call first. None when every circuit is open."""
        candidates = [r for r in self.replicas if r.available()]
        if not candidates:
            return None
        fresh = [r for r in candidates if r.url not in exclude] or candidates
        healthy = [r for r in fresh if r.healthy] or fresh  # stale health must not refuse every request
        self._turn += 1
        k = self._turn % len(healthy)
        return min(healthy[k:] + healthy[:k], key=lambda r: (r.load, r.failures))
