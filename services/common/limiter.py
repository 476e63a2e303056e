"""The server's bound on work in flight, counted in items: each unary call is one, each item of a request
stream (GenerateBatch, AnnotateStream) is one.

A unary call that finds no free slot gets RESOURCE_EXHAUSTED at once; a stream item waits for one.
Waiters are served first come, first served and a stream has at most one waiter at a time (its reader
is sequential, services/common/stream.py), so streams take turns: one item each, round-robin.
"""
from __future__ import annotations

import asyncio
from collections import deque
from contextlib import contextmanager

from prometheus_client import Gauge

from moaa.services.common.errors import ResourceExhausted


class Slots:
    """At most `limit` holders; waiters are served first come, first served and a freed slot is handed
    to the next waiter directly, so a newcomer never overtakes one that waits."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def free(self) -> bool:
        """A slot could be taken now, without waiting."""
        return self.in_flight < self.limit and not self._waiters

    def _take(self) -> None:
        self.in_flight += 1

    def try_acquire(self) -> bool:
        if not self.free:
            return False
        self._take()
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # _wake() hands the slot over, already counted
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # got the slot just as we were cancelled: pass it on
            elif fut in self._waiters:  # a cancelled waiter may already have been dropped by _wake()
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)


class InFlightLimiter(Slots):
    def __init__(self, max_in_flight: int, gauge: Gauge | None = None, high_water_gauge: Gauge | None = None):
        super().__init__(max_in_flight)
        self.high_water = 0  # the most slots ever held at once (never above max_in_flight)
        self._gauge = gauge
        self._high_water_gauge = high_water_gauge

    @property
    def max_in_flight(self) -> int:
        return self.limit

    def _take(self) -> None:
        super()._take()
        if self._gauge is not None:
            self._gauge.inc()
        if self.in_flight > self.high_water:
            self.high_water = self.in_flight
            if self._high_water_gauge is not None:
                self._high_water_gauge.set(self.high_water)

    def release(self) -> None:
        if self._gauge is not None:
            self._gauge.dec()
        super().release()

    @contextmanager
    def slot(self):
        """Hold one slot for the duration of a unary call; raises ResourceExhausted when none is free."""
        if not self.try_acquire():
            raise ResourceExhausted(
                f"server busy: {self.in_flight} items in flight (max_in_flight={self.max_in_flight}); "
                "retry with backoff, send the work as one batch stream (its items wait for capacity), "
                "or raise max_in_flight")
        try:
            yield
        finally:
            self.release()
