"""The windowed driver of the bidirectional dataset streams (GenerateBatch, AnnotateStream).

gRPC sends queued requests as fast as HTTP/2 allows, so the client keeps its own window: a new item is
fed only when a result came back. A stop (the token budget) therefore stops feeding within one window;
the items in flight finish and their results are still delivered (their tokens are already spent).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterable

import grpc

from .endpoint import Endpoint
from .errors import call_error


async def windowed(rpc, requests: Iterable, *, ep: Endpoint, what: str, window: int,
                   stop: Callable[[], bool] | None = None,
                   hint: Callable[[], str] | None = None) -> AsyncIterator:
    """Results of `rpc` (a stream-stream method of a stub) over `requests`, at most `window` in flight.
    A failed call raises UserError / TransientError naming `what`; `hint()` is added to its message."""
    slots = asyncio.Semaphore(max(1, window))

    async def feed():
        for req in requests:
            await slots.acquire()
            if stop is not None and stop():
                return
            yield req

    try:
        async for res in rpc(feed(), metadata=ep.metadata):
            slots.release()
            yield res
    except grpc.aio.AioRpcError as err:
        raise call_error(err, f"{what} at {ep.address}", hint() if hint else "") from None
