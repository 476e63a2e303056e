"""The wrapper every servicer method goes through: request id, in-flight cap, metrics, error mapping.

Servicers raise `RpcError` subclasses (or UserError/LookupError/KeyError for bad names); this turns them
into gRPC statuses with their message, records the call in Prometheus, and logs one line per call
without prompt text.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time

import grpc

from moaa.errors import UserError
from moaa.services.common.errors import RpcError, Unavailable
from moaa.services.common.limiter import InFlightLimiter
from moaa.services.common.logs import call_request_id, request_id_var
from moaa.services.common.metrics import Metrics

log = logging.getLogger("moaa.rpc")
_door_log = logging.getLogger("moaa.http")  # the gateway's OpenAI-compatible door


MAX_MESSAGE = 2000  # status details travel in a header (16 KiB limit): a message echoing a huge field
# would otherwise be replaced by the client's RESOURCE_EXHAUSTED "metadata size exceeds hard limit"


def clip(msg: str, limit: int = MAX_MESSAGE) -> str:
    """`msg` cut in the middle to `limit` characters: the field named at the start and the advice at the
    end both stay."""
    if len(msg) <= limit:
        return msg
    head, tail = limit * 2 // 3, limit // 3
    return f"{msg[:head]} [... {len(msg) - head - tail} characters cut ...] {msg[-tail:]}"


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, RpcError):
        return err.code, clip(str(err))
    if isinstance(err, (UserError, LookupError)):
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        return grpc.StatusCode.INVALID_ARGUMENT, clip(str(msg))
    # The exception's type and text stay in the server's log (the caller logs it with the request id):
    # they can carry paths, config and other callers' data.
    return grpc.StatusCode.INTERNAL, (f"internal error (request id {request_id_var.get()}): the server logged "
                                      "the details; report the request id to its operators")


async def _abort(context, code: grpc.StatusCode, msg: str) -> None:
    """Abort with a status, unless the call already ended (deadline passed, client gone): then there is
    nobody to tell, and grpc would raise ExecuteBatchError instead."""
    if context.done() or context.cancelled():
        raise asyncio.CancelledError()
    try:
        await context.abort(code, msg)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - the call ended meanwhile (cygrpc.ExecuteBatchError)
        raise asyncio.CancelledError() from None


def _aborted_code(context) -> grpc.StatusCode:
    try:
        return context.code() or grpc.StatusCode.UNKNOWN
    except Exception:  # noqa: BLE001
        return grpc.StatusCode.UNKNOWN


# The client's deadline starts before the server's (the server counts from the request's arrival), so
# the client's cancel at its deadline reaches the server with a little of the server's time still left.
_DEADLINE_SLACK_S = 0.25


def _past_deadline(context, slack_s: float = 0.0) -> bool:
    left = time_remaining(context)
    return left is not None and left <= slack_s


def _ended(context) -> bool:
    """The call is over for the client (cancelled, or its deadline passed) though its handler returned."""
    if _past_deadline(context):
        return True
    try:
        return context.cancelled()
    except Exception:  # noqa: BLE001 - some contexts (tests) have none
        return False


def _cut_code(context) -> grpc.StatusCode:
    """A call that ended before its handler did: what the client saw (grpc cancels the handler when the
    deadline passes too)."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if _past_deadline(context, _DEADLINE_SLACK_S) else grpc.StatusCode.CANCELLED


class CallGuard:
    """Per-server state the guard needs: limiter and metrics."""

    def __init__(self, limiter: InFlightLimiter, metrics: Metrics, request_limit=None, stream_age_s: float | None = None,
                 write_timeout_s: float | None = None):
        self.limiter = limiter
        self.stream_age_s = stream_age_s  # batch streams end gracefully after it (transport.py: rebalancing)
        self.write_timeout_s = write_timeout_s  # a streamed message the client takes none of for this long ends the call
        self.metrics = metrics
        self.request_limit = request_limit  # decoding.RequestLimit: max_request_bytes, checked per stream item too
        self.streams: set = set()  # open ItemStreams (GenerateBatch, AnnotateStream): a stopping server closes them

    def writer(self, context):
        """`context.write` bounded by write_timeout_s (write_within)."""
        async def write(message) -> None:
            await write_within(context, message, self.write_timeout_s)
        return write

    def done(self, method: str, code: str, seconds: float, request_id: str, transport: str = "grpc") -> None:
        """A finished call, on either door (refused ones included): counted by code, and one log line."""
        self.metrics.call_done(method, code, seconds, transport=transport)
        extra = {"request_id": request_id, "method": method, "code": code, "seconds": round(seconds, 4)}
        if transport == "grpc":
            log.info("call", extra=extra)
        else:
            _door_log.info("call", extra={**extra, "transport": transport})


@contextlib.asynccontextmanager
async def _call_scope(guard: CallGuard, name: str, request, context):
    """Everything around one call: request id, in-flight slot, error -> status, metrics, one log line."""
    items = hasattr(request, "__aiter__")  # a request stream: its items take in-flight slots (stream.py)
    rid = call_request_id("" if items else getattr(request, "request_id", ""), context)
    token = request_id_var.set(rid)
    t0 = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        with contextlib.nullcontext() if items else guard.limiter.slot():
            yield rid
        if _ended(context):  # a request stream cut by the client or the deadline can read as its normal end
            code = _cut_code(context)
    except asyncio.CancelledError:
        code = _cut_code(context)
        raise
    except grpc.aio.AbortError:
        code = _aborted_code(context)
        raise
    except Exception as err:  # noqa: BLE001 - every error becomes a status
        code, msg = status_of(err)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("%s failed", name)
        await _abort(context, code, msg)
    finally:
        guard.done(name, code.name, time.perf_counter() - t0, rid)
        request_id_var.reset(token)


async def write_within(context, message, timeout: float | None) -> None:
    """`context.write(message)`, which returns once the transport took it; a client that takes none of it
    within `timeout` seconds ends the call UNAVAILABLE. Without this bound a client that reads nothing would
    hold the call (and its in-flight slots) until its own deadline: the wait is inside grpc's write, where
    a timer around an async generator's yield never fires. The status itself reaches the client only after
    what it left unread (the call's slots are free before that)."""
    if timeout is None:
        await context.write(message)
        return
    # a timer that cancels this task, not asyncio.wait_for: on Python < 3.12 that starts a task per write
    task = asyncio.current_task()
    expired = []
    timer = asyncio.get_running_loop().call_later(timeout, lambda: expired.append(task.cancel()))
    try:
        await context.write(message)
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):  # 3.11+: this cancel is ours and answered here
            task.uncancel()
        raise Unavailable(f"this call's client took none of its results for {timeout:g} s "
                          "(the server's transport.write_timeout_s): read the stream as it comes") from None
    finally:
        timer.cancel()


def guarded(method):
    """Decorator for servicer methods (unary or async-generator); `self.guard` is a CallGuard. An async
    generator's messages are written by the wrapper (bounded by write_within), so grpc sees a coroutine."""
    name = method.__name__

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream_handler(self, request, context):
            async with _call_scope(self.guard, name, request, context) as rid:
                write = self.guard.writer(context)
                async for item in method(self, request, context, rid):
                    await write(item)
        return stream_handler

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        async with _call_scope(self.guard, name, request, context) as rid:
            return await method(self, request, context, rid)
    return unary_wrapper


def time_remaining(context) -> float | None:
    """Seconds left of the caller's deadline, None when it set none."""
    try:
        return context.time_remaining()
    except Exception:  # noqa: BLE001 - some contexts (tests) have none
        return None
