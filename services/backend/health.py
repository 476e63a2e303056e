"""Health judged by real inference: a periodic tiny completion per replica and the progress of the
requests in flight. vLLM's /health can answer 200 while its engine is hung, so it is not consulted."""
from __future__ import annotations

import asyncio
import logging
import random
import time

from .client import BackendClient
from .errors import BackendError
from .replicas import HALF_OPEN, Replica

log = logging.getLogger("moaa.backend")


def check_progress(client: BackendClient, replica: Replica) -> bool:
    """False when requests are in flight but no byte arrived for longer than chunk_gap_s."""
    stalled_for = time.monotonic() - replica.last_progress
    if replica.in_flight > 0 and stalled_for > client.cfg.timeouts.chunk_gap_s:
        if replica.healthy:
            log.warning("backend %s replica %s: %d requests in flight, no progress for %.1fs",
                        client.name, replica.url, replica.in_flight, stalled_for)
        replica.healthy = False
        replica.last_error = f"no progress on {replica.in_flight} live requests for {stalled_for:.1f}s"
        return False
    return True


async def probe_once(client: BackendClient, replica: Replica) -> bool:
    """One probe; updates the replica's health (and settles a half-open circuit)."""
    try:
        latency = await client.probe(replica)
    except BackendError as err:
        if err.cause == "rate_limited":  # busy but answering: alive
            return check_progress(client, replica)
        if replica.healthy:
            log.warning("backend %s replica %s: health probe failed: %s", client.name, replica.url, err.cause)
        replica.healthy = False
        replica.last_error = f"probe {err.cause}: {err.message}"
        if replica.circuit == HALF_OPEN:
            replica.record_failure(replica.last_error)
        return False
    replica.last_probe_latency_s = latency
    if not replica.healthy:
        log.info("backend %s replica %s: healthy again (probe %.3fs)", client.name, replica.url, latency)
    replica.healthy = True
    if replica.circuit == HALF_OPEN:
        replica.record_success()
    return check_progress(client, replica)


async def probe_loop(client: BackendClient, replica: Replica) -> None:
    """Runs until cancelled. The first probe waits one (jittered) interval so that a fresh pool does
    not hit every backend at once."""
    interval = client.cfg.health.probe_interval_s
    while True:
        await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        check_progress(client, replica)
        try:
            await probe_once(client, replica)
        except asyncio.CancelledError:
            raise
        except Exception:  # a probe must never kill the loop
            log.exception("backend %s replica %s: probe crashed", client.name, replica.url)
