"""Per-backend rate limit (asyncio-throttle) and a per-replica concurrency cap that adapts to 429s."""
from __future__ import annotations

import math

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
