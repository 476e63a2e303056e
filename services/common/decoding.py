"""Undecodable request bytes answer INVALID_ARGUMENT, not grpc.aio's UNKNOWN.

grpc.aio runs the request deserializer before any servicer code, and an exception there becomes
UNKNOWN with the exception's text. This server interceptor gives every handler (ours, health,
reflection) a deserializer that never raises: it returns an `Undecodable` marker, and the wrapped
handler aborts with INVALID_ARGUMENT naming the message type it expected. For streamed requests, reading
that message raises `UndecodableRequest` (an RpcError with that status) in the servicer, so a servicer that
holds earlier items (ItemStream) answers them first; the wrapped handler aborts with it if nothing did.

The same deserializer enforces `max_request_bytes` on unary requests (RESOURCE_EXHAUSTED naming the size,
the limit and the setting): the transport's own limit is set higher (server.py), so that an oversized item
of a batch stream can be refused alone (services/common/stream.py) instead of ending the whole stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from dataclasses import dataclass

import grpc

from moaa.services.common.errors import RpcError
from moaa.services.common.logs import call_request_id

# Bounds on reading a request stream that is about to be refused (drain_requests).
DRAIN_IDLE_S = 0.2
DRAIN_TOTAL_S = 1.0
DRAIN_MAX_ITEMS = 1000


class Undecodable:
    """Stands in for a request message whose bytes did not parse (or that is over the size limit)."""

    __slots__ = ("code", "message")

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT):
        self.message = message
        self.code = code


@dataclass(frozen=True)
class RequestLimit:
    """A server's `max_request_bytes` and the setting that holds it (e.g. 'gateway.max_request_bytes')."""
    max_bytes: int
    setting: str

    def refusal(self, size: int, what: str = "the request") -> str | None:
        """Why a message of `size` bytes is refused, or None when it fits."""
        if size <= self.max_bytes:
            return None
        return (f"{what} is {size} bytes, over the limit of {self.max_bytes} bytes ({self.setting}): "
                f"send less, or raise {self.setting}")


class UndecodableRequest(RpcError):
    """Raised where a servicer reads an Undecodable message of its request stream."""


def _type_name(deserializer) -> str:
    owner = getattr(deserializer, "__self__", None)  # e.g. GenerateRequest.FromString
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "") or "the request message"


def safe_deserializer(deserializer, limit: RequestLimit | None = None):
    """`deserializer` that returns Undecodable instead of raising (and for bytes over `limit`); None (raw
    bytes) stays None."""
    if deserializer is None:
        return None
    name = _type_name(deserializer)

    def decode(raw: bytes):
        too_big = limit.refusal(len(raw)) if limit is not None else None
        if too_big is not None:
            return Undecodable(too_big, grpc.StatusCode.RESOURCE_EXHAUSTED)
        try:
            return deserializer(raw)
        except Exception as err:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            return Undecodable(f"request bytes do not parse as {name} ({type(err).__name__}: "
                               f"{str(err).rsplit(':', 1)[-1].strip() or 'corrupt'}): send a serialized {name}")
    return decode


async def drain_requests(requests) -> None:
    """Read (and drop) what a client already sent on a request stream the server is about to refuse.

    grpc.aio's client reports a write that fails after the server's status as INTERNAL "Internal error
    from Core" instead of that status (grpc/grpc#36066), so a refusal sent while the client still writes
    would reach it as INTERNAL. Bounded: a client that keeps sending, or waits for results before it
    sends more, gets the status after DRAIN_IDLE_S of quiet, DRAIN_TOTAL_S or DRAIN_MAX_ITEMS."""
    it = aiter(requests)
    end = time.monotonic() + DRAIN_TOTAL_S
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        for _ in range(DRAIN_MAX_ITEMS):
            left = end - time.monotonic()
            if left <= 0:
                return
            await asyncio.wait_for(anext(it), min(DRAIN_IDLE_S, left))


async def _reject(context, bad: Undecodable, requests=None) -> None:
    if requests is not None:
        await drain_requests(requests)
    call_request_id("", context)  # the client's x-request-id comes back with the refusal too
    await context.abort(bad.code, bad.message)


def _checked_iterator(requests):
    async def gen():
        async for item in requests:
            if isinstance(item, Undecodable):
                await drain_requests(requests)   # first, while the servicer may still write results
                raise UndecodableRequest(item.message, item.code)
            yield item
    return gen()


def _wrap_behavior(behavior, request_streaming: bool, response_streaming: bool):
    """The same kind of callable as `behavior` (coroutine function or async generator function)."""

    def check(request, context):
        if request_streaming:
            return _checked_iterator(request), None
        return request, request if isinstance(request, Undecodable) else None

    if response_streaming and inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            request, bad = check(request, context)
            if bad is not None:
                await _reject(context, bad)
            try:
                async for item in behavior(request, context):
                    yield item
            except UndecodableRequest as err:   # a handler that let it through (health, reflection)
                await _reject(context, Undecodable(str(err), err.code))
        return stream

    async def call(request, context):
        request, bad = check(request, context)
        if bad is not None:
            await _reject(context, bad)
        try:
            result = behavior(request, context)
            if inspect.isawaitable(result):
                return await result
            if response_streaming and hasattr(result, "__aiter__"):  # async generator from a plain function
                async for item in result:
                    await context.write(item)
                return None
        except UndecodableRequest as err:   # a handler that let it through (health, reflection)
            await _reject(context, Undecodable(str(err), err.code))
        return result
    return call


# handler attribute -> (request streaming, response streaming, the grpc factory that makes such a handler)
HANDLER_KINDS = {
    "unary_unary": (False, False, grpc.unary_unary_rpc_method_handler),
    "unary_stream": (False, True, grpc.unary_stream_rpc_method_handler),
    "stream_unary": (True, False, grpc.stream_unary_rpc_method_handler),
    "stream_stream": (True, True, grpc.stream_stream_rpc_method_handler),
}


def guard_handler(handler: grpc.RpcMethodHandler, limit: RequestLimit | None = None) -> grpc.RpcMethodHandler:
    """`limit` applies to unary requests; a request stream's items are checked one by one by ItemStream."""
    for attr, (req_stream, resp_stream, make) in HANDLER_KINDS.items():
        behavior = getattr(handler, attr)
        if behavior is not None:
            return make(_wrap_behavior(behavior, req_stream, resp_stream),
                        request_deserializer=safe_deserializer(handler.request_deserializer,
                                                               None if req_stream else limit),
                        response_serializer=handler.response_serializer)
    return handler


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Put it last (innermost), so that the auth interceptor's refusals use the safe deserializer too."""

    def __init__(self, limit: RequestLimit | None = None):
        self.limit = limit

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        return guard_handler(handler, self.limit) if handler is not None else None
