"""The windowed driver of the bidirectional dataset streams (GenerateBatch, AnnotateStream).

gRPC sends queued requests as fast as HTTP/2 allows, so the client keeps its own window: a new item is
fed only when a result came back. A stop (the token budget) therefore stops feeding within one window;
the items in flight finish and their results are still delivered (their tokens are already spent).

A server that is down or restarting (UNAVAILABLE) is retried a bounded number of times (`RETRY_DELAYS_S`,
counted since the last result): the new call sends the items that got no result first, then the rest,
so every item is answered once; so is a call that ends cleanly with items unanswered. Any other status
ends the run at once.

An item the server answered with a bad-input status (INVALID_ARGUMENT: e.g. a prompt past the model's
context, or over the server's max_request_bytes) can never succeed: with `reject`, the driver hands it
to `reject(id, "CODE: message")` (the caller records it once, as a rejection a re-run does not resend) and
does not yield it; an item that failed for a reason a retry may fix (UNAVAILABLE, ...) is yielded as
before, for the caller to keep pending.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import AsyncIterator, Callable, Iterable

import grpc

from moaa.errors import TransientError

from .endpoint import Endpoint
from .errors import backoff, call_error, is_bad_input, retry_delay


async def windowed(rpc, requests: Iterable, *, ep: Endpoint, what: str, window: int,
                   stop: Callable[[], bool] | None = None,
                   hint: Callable[[], str] | None = None,
                   reject: Callable[[str, str], None] | None = None) -> AsyncIterator:
    """Results of `rpc` (a stream-stream method of a stub) over `requests` (each with an `id`), at most
    `window` in flight. A failed call raises UserError / TransientError naming `what`; `hint()` is added
    to its message. With `reject`, items answered with a bad-input status go there instead (see above)."""
    source = iter(requests)
    unanswered: dict[str, object] = {}   # fed to a call (or taken for it), no result yet: resent on a retry
    tries = 0
    while True:
        slots = asyncio.Semaphore(max(1, window))
        resend = list(unanswered.values())
        ended = asyncio.Event()   # the call is over: its feed must stop waiting for a slot (and take nothing)

        async def feed(resend=resend, slots=slots, ended=ended):
            for req in itertools.chain(resend, source):
                unanswered[req.id] = req   # before waiting for a slot: a call cut while waiting loses nothing
                await slots.acquire()
                if ended.is_set() or (stop is not None and stop()):
                    return
                yield req

        try:
            async for res in rpc(feed(), metadata=ep.metadata):
                slots.release()
                unanswered.pop(res.id, None)
                tries = 0
                if reject is not None and res.WhichOneof("result") == "error" and is_bad_input(res.error.code):
                    reject(res.id, f"{res.error.code}: {res.error.message}")
                    continue
                yield res
            if not unanswered or (stop is not None and stop()):
                return
            # the server ended the call as if done, with items it took unanswered: asked again, bounded as
            # UNAVAILABLE is (`tries` counts since the last result), never taken for an answer
            ended.set()
            slots.release()
            delay = backoff(tries)
            if delay is None:
                raise TransientError(f"{what} at {ep.address}: the stream ended with {len(unanswered)} items "
                                     f"unanswered, {tries + 1} times" + (f" ({hint()})" if hint else ""))
            await asyncio.sleep(delay)
            tries += 1
        except grpc.aio.AioRpcError as err:
            ended.set()
            slots.release()   # wakes a feed left waiting: it returns, its item stays unanswered
            delay = retry_delay(err, tries)
            if delay is None:
                raise call_error(err, f"{what} at {ep.address}", hint() if hint else "", tries=tries) from None
            await asyncio.sleep(delay)
            tries += 1
