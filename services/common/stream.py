"""The one bounded bidirectional stream of items, shared by GenerateBatch and AnnotateStream.

An item holds a slot of its stream's window and one of the server's in-flight slots (InFlightLimiter)
from the moment it is read until its result has been WRITTEN to the transport. So a client that does
not read stops the server from reading its requests (gRPC flow control then holds the client back), and
no stream keeps more than `window` results in memory. A failed item becomes an error result through the
one `status_of`; the stream goes on. Ending the stream (client gone, deadline, shutdown) cancels the
items still running and waits for them before the call returns. A server that starts its graceful stop
`close()`s its open streams: they read no more items, finish and write the ones they hold, then end
UNAVAILABLE, so the client resends the rest to a server that is not going away. A stream older than
`max_age_s` (the server's transport.max_connection_age_s) closes itself the same way, so the client's
new call goes over a new connection, possibly to another replica (transport.py). A request that does not
parse ends the stream INVALID_ARGUMENT, also only after the items held before it are written. With `admit` (the backends' Admission,
services/backend/limits.py) an item starts only when the backends it needs have room, so the window is
an upper bound and the backends' free capacity decides how many items run. With `limit` (the server's
max_request_bytes), an item larger than it is an INVALID_ARGUMENT item error naming its size, the limit and
the setting; the stream goes on (the transport's own limit is set higher: server.py TRANSPORT_MAX_BYTES).
"""
from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterable, Awaitable, Callable, Generic, TypeVar

import grpc

from moaa.idset import IdSet
from moaa.services.common.decoding import RequestLimit, drain_requests
from moaa.services.common.errors import InvalidArgument, Unavailable
from moaa.services.common.limiter import InFlightLimiter
from moaa.services.common.rpc import status_of
from moaa.services.common.validation import check_item_id

log = logging.getLogger("moaa.rpc")

Req = TypeVar("Req")
Res = TypeVar("Res")

_END = object()


class _ReadFailed:
    def __init__(self, err: BaseException):
        self.err = err


class ItemStream(Generic[Req, Res]):
    """`handle(request) -> result` run for each request, at most `window` items held at once; results
    in the order they complete. `failed(request, code_name, message)` builds the error result."""

    def __init__(self, handle: Callable[[Req], Awaitable[Res]], failed: Callable[[Req, str, str], Res], *,
                 window: int, limiter: InFlightLimiter, live: set | None = None,
                 admit: Callable[[Req, Callable[[], asyncio.Task]], Awaitable[None]] | None = None,
                 item_id: Callable[[Req], str] | None = None, limit: RequestLimit | None = None,
                 max_age_s: float | None = None):
        self.handle = handle
        self.failed = failed
        self.window = window
        self.limiter = limiter
        self.live = live  # the servicer's set of open streams (tests and metrics look at them)
        self.admit = admit  # admit(request, spawn): waits for backend capacity, then calls spawn()
        self.item_id = item_id  # results are matched to requests by it: empty or repeated ids are item errors
        self.limit = limit
        self.max_age_s = max_age_s  # then close() itself: the client resends the rest on a new connection
        self._seen = IdSet()  # every id the stream was sent, at 16 bytes each (a set of str: ~100)
        self.read = 0  # requests read from the client
        self.written = 0  # results the transport took
        self.held = 0  # items read and not yet written: each holds a window slot and an in-flight slot
        self.max_held = 0
        self.max_queued = 0  # most finished results ever waiting for the transport
        self._results: asyncio.Queue = asyncio.Queue()
        self._room = asyncio.Semaphore(window)
        self._tasks: set[asyncio.Task] = set()
        self._reader: asyncio.Task | None = None
        self._next: asyncio.Task | None = None  # the pending read of the next request: close() leaves it running
        self._it = None
        self._eof = False  # the client sent its last item
        self._closing: str | None = None  # why the server stopped reading (shutdown)

    def close(self, why: str) -> None:
        """Read no more items (the server is stopping); those held are finished and written, then the call
        ends UNAVAILABLE with `why`."""
        if self._closing is None and self._reader is not None and not self._reader.done():
            self._closing = why
            self._reader.cancel()

    @property
    def queued(self) -> int:
        """Finished results waiting to be written."""
        return self._results.qsize()

    @property
    def running(self) -> int:
        return len(self._tasks)

    async def _one(self, request: Req) -> None:
        try:
            result = await self.handle(request)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - one bad item does not end the stream
            code, msg = status_of(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("stream item failed")
            result = self.failed(request, code.name, msg)
        self._results.put_nowait(result)
        self.max_queued = max(self.max_queued, self._results.qsize())

    def _spawn(self, request: Req) -> asyncio.Task:
        task = asyncio.create_task(self._one(request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read(self, requests: AsyncIterable[Req]) -> None:
        try:
            it = self._it = aiter(requests)
            while True:
                await self._room.acquire()  # given back after a result was written
                self._next = asyncio.ensure_future(anext(it))
                try:  # shielded: a close() must not kill the request iterator, _drained reads it on
                    request = await asyncio.shield(self._next)
                except StopAsyncIteration:
                    break
                await self.limiter.acquire()  # the server-wide bound: wait our turn
                self.read += 1
                self.held += 1
                self.max_held = max(self.max_held, self.held)
                if self.item_id is not None:
                    try:
                        check_item_id(self.item_id(request), self._seen)  # in reading order: the first use wins
                    except InvalidArgument as err:
                        self._results.put_nowait(self.failed(request, "INVALID_ARGUMENT", str(err)))
                        continue
                too_big = self.limit.refusal(request.ByteSize(), "this item") if self.limit is not None else None
                if too_big is not None:
                    self._results.put_nowait(self.failed(request, "INVALID_ARGUMENT", too_big))
                    continue
                if self.admit is None:
                    self._spawn(request)
                else:
                    await self.admit(request, lambda: self._spawn(request))
            self._eof = True
            await self._finish_taken()
            self._results.put_nowait(_END)
        except asyncio.CancelledError:
            if self._closing is None:
                raise
            await self._finish_taken()  # close(): what was taken is finished, not cut
            self._results.put_nowait(_END if self._eof else _ReadFailed(Unavailable(self._closing)))
        except Exception as err:  # noqa: BLE001 - reading failed (bytes that are no request): the call ends
            # with that error, after the items already taken are finished and written, as close() does: they
            # were valid, and their backend work is paid for
            await self._finish_taken()
            self._results.put_nowait(_ReadFailed(err))

    async def _finish_taken(self) -> None:
        """Wait for every item taken so far (their results queue up to be written)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _drained(self):
        """The requests after close(): the pending read's, then the rest (all dropped: resent by the client)."""
        if self._next is not None:
            yield await self._next
        if self._it is not None:
            async for request in self._it:
                yield request

    async def serve(self, requests: AsyncIterable[Req], write: Callable[[Res], Awaitable[None]]) -> None:
        """Read `requests`, write each result with `write` (grpc's `context.write`, which returns once the
        transport took the message; CallGuard.writer bounds it). Runs in the call's own task, so a cancelled call (client gone,
        deadline) cancels and awaits the items still running before it returns."""
        reader = self._reader = asyncio.create_task(self._read(requests))
        if self.live is not None:
            self.live.add(self)
        aged = None if self.max_age_s is None else asyncio.get_running_loop().call_later(
            self.max_age_s, self.close, f"this stream is {self.max_age_s:g} s old (transport.max_connection_age_s): "
            "resend the items that got no result, on a new connection")
        try:
            while True:
                result = await self._results.get()
                if result is _END:
                    return
                if isinstance(result, _ReadFailed):
                    if self._closing is not None:  # what the client sent meanwhile is read first (drain_requests)
                        await drain_requests(self._drained())
                    raise result.err
                await write(result)  # returns once the transport took it: the backpressure
                self.written += 1
                self.held -= 1
                self.limiter.release()
                self._room.release()
        finally:
            if aged is not None:
                aged.cancel()
            if self._next is not None:
                self._next.cancel()
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()
            try:
                await asyncio.gather(reader, *self._tasks, return_exceptions=True)
            finally:  # even when a second cancel (the client gone just as the call ended) cuts the wait short
                for _ in range(self.held):  # results never written still held their in-flight slots
                    self.limiter.release()
                self.held = 0
                if self.live is not None:
                    self.live.discard(self)
