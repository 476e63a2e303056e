"""Per-backend rate limit (asyncio-throttle) and a per-replica concurrency cap that adapts to 429s."""
from __future__ import annotations

import asyncio
import math
from contextvars import ContextVar

from asyncio_throttle import Throttler

from moaa.services.common.limiter import Slots


def make_throttler(rate_per_s: float | None) -> Throttler | None:
    """A throttler for `rate_per_s` requests per second (fractions allowed), or None for no limit."""
    if not rate_per_s:
        return None
    burst = max(1, math.ceil(rate_per_s))
    # asyncio-throttle counts `burst` requests per `period`; a short retry interval keeps added latency low.
    return Throttler(rate_limit=burst, period=burst / rate_per_s, retry_interval=min(0.01, 0.5 / rate_per_s))


class AdaptiveLimit(Slots):
    """A semaphore whose limit halves when the backend says 429 and grows back by one per window of
    successes (additive increase, multiplicative decrease), never above `maximum`."""

    def __init__(self, maximum: int):
        super().__init__(maximum)
        self.maximum = maximum
        self._successes = 0
        self.epoch = 0  # bumped at each halving; 429s of requests sent before it are the same signal

    def on_rate_limited(self, epoch: int | None = None) -> None:
        """Halves the limit, once per burst: requests admitted before the last halving (an older
        `epoch`) were sent under the old limit, so their 429s are not a new signal."""
        if epoch is not None and epoch != self.epoch:
            return
        self.limit = max(1, self.limit // 2)
        self.epoch += 1
        self._successes = 0

    def on_success(self) -> None:
        if self.limit >= self.maximum:
            return
        self._successes += 1
        if self._successes >= self.limit:
            self._successes = 0
            self.limit += 1
            self._wake()


# Set by Admission in the task of an admitted item (and so in every task it starts); the backend client
# sets the event when the item's first request joins a backend's queue or gets a slot.
ITEM_STARTED: ContextVar[asyncio.Event | None] = ContextVar("moaa_item_started", default=None)


class Admission:
    """Admits the items of batch streams by the backends' free capacity instead of a fixed count.

    An item may start when every model of its first phase (proposers, judges) has a free slot, and no model
    of a later phase (aggregator) already has a full round of its capacity waiting. One item is admitted
    at a time, first come first served across streams, and the next one only once the previous item's
    first request reached its backend, so that every decision sees the load the earlier ones added.
    Backends whose every replica's circuit is open do not hold items back: they fail fast with a typed
    error instead.
    """

    def __init__(self, pool):
        self.pool = pool
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        for name in pool.names:
            pool.client(name).on_release.append(self._changed.set)

    def _room(self, first, later) -> bool:
        for name in first:
            client = self.pool.client(name)
            free = sum(max(0, r.limit.limit - r.limit.in_flight) for r in client.replicas.replicas if r.available())
            if free - client.queued <= 0 and client.available:
                return False
        for name in later:
            client = self.pool.client(name)
            if client.queued >= client.capacity and client.available:
                return False
        return True

    async def admit(self, first, later, spawn) -> None:
        """Wait for room, then `spawn()` the item's task (it inherits ITEM_STARTED) and wait until its
        first request reached a backend or it ended."""
        first = [m for m in first if m in self.pool]
        later = [m for m in later if m in self.pool]
        async with self._lock:
            while not self._room(first, later):
                self._changed.clear()
                await self._changed.wait()
            started = asyncio.Event()
            token = ITEM_STARTED.set(started)
            try:
                task = spawn()
            finally:
                ITEM_STARTED.reset(token)
            waiter = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
