"""A cap on calls in flight: one more than `max_in_flight` gets RESOURCE_EXHAUSTED at once."""
from __future__ import annotations

import asyncio
from contextlib import contextmanager

from prometheus_client import Gauge

from moaa.services.common.errors import ResourceExhausted


class InFlightLimiter:
    def __init__(self, max_in_flight: int, gauge: Gauge | None = None):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self._gauge = gauge
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def slot(self):
        """Hold one slot for the duration of a call; raises ResourceExhausted when none is free."""
        if self.in_flight >= self.max_in_flight:
            raise ResourceExhausted(
                f"server busy: {self.in_flight} calls in flight (max_in_flight={self.max_in_flight}); "
                "retry with backoff or raise max_in_flight")
        self.in_flight += 1
        self._idle.clear()
        if self._gauge is not None:
            self._gauge.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self._gauge is not None:
                self._gauge.dec()
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """True when no call is in flight (within `timeout`)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
