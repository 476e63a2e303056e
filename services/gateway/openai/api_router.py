"""The HTTP door's transport (aiohttp): routes, bearer auth, request ids, the in-flight limit, metrics,
one log line per call, SSE. The logic lives in serving.py.

    GET  /health                 200 while serving: liveness (no token needed: probes)
    GET  /health/ready           200, or 503 with the reason while no recipe can be answered (its backends
                                 unreachable): readiness, as the gRPC status of moaa.v1.MoAGateway
    GET  /v1/models              recipes, and plain backends marked as such
    GET  /v1/models/{model}      one of them (404 unknown model)
    POST /v1/chat/completions    streamed (SSE) or not
    POST /v1/responses           the Responses API, stateless (responses_serving.py), streamed or not
    GET|POST|DELETE /v1/responses/{id}...  404: moaa stores no responses
    OPTIONS (every route)        CORS preflights, when gateway.http_cors_origins names origins (cors.py)

Both APIs run through one call path (_call): body, in-flight slot, serving, answer or SSE, errors,
metrics. Calls share the gRPC server's limiter, metrics (transport="http") and bearer tokens. A client that
hangs up cancels its handler (handler_cancellation), which closes the engine's generator and with it
the backend requests, as a gRPC cancel does.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import grpc
import orjson
from aiohttp import web

from moaa.services.common.auth import TokenStore, bearer_problem
from moaa.services.common.errors import RpcError
from moaa.services.common.logs import REQUEST_ID_HEADER as REQUEST_ID
from moaa.services.common.logs import client_request_id, request_id_var
from moaa.services.common.rpc import CallGuard, status_of
from moaa.services.config import GatewayConfig

from . import protocol as p
from . import responses_protocol as rp
from .cors import allow_origins
from .responses_serving import ResponsesServing
from .serving import RETRY_AFTER_S, Call, ChatServing, HttpError, http_error, validated

log = logging.getLogger("moaa.http")
CHAT_METHOD = "ChatCompletions"
RESPONSES_METHOD = "Responses"
_EXEMPT = ("/health",)
# what the middleware and the handlers keep on a request: its id, and the SSE response once headers are out
_RID = web.RequestKey("rid", str)
_STREAM = web.RequestKey("stream", web.StreamResponse)
# OpenAI routes a tool may call by default that moaa does not serve: what to use instead
_NOT_SERVED = {"/v1/completions": "moaa serves chat models only: send the prompt as a user message to POST "
                                  "/v1/chat/completions (LlamaIndex's OpenAILike: is_chat_model=True)"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(model, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json(exclude_none=False), status=status,
                        content_type="application/json", headers=headers)


def _error(code: grpc.StatusCode, message: str, param: str | None = None) -> web.Response:
    status, body = http_error(code, message, param)
    # the SDKs retry 429 and 5xx, waiting what Retry-After says: over max_in_flight, or too few models answered;
    # a call past its own deadline would pass it again, each try paying the backends: not retried
    headers = ({"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503)
               else {"x-should-retry": "false"} if status == 504 else None)
    return _json(body, status, headers)


@dataclass(frozen=True)
class _Api:
    """One OpenAI API over the engine: its metrics' method name, how a body becomes a checked call (or an
    HttpError naming the field), its answer, and its stream (see serving.ChatStream)."""

    method: str
    check: Callable[[Any, str], Call]
    answer: Callable[[Call, Any], Any]
    stream: Callable[[Call], Any]


class OpenAIRouter:
    def __init__(self, serving: ChatServing, guard: CallGuard, server_cfg: GatewayConfig):
        self.serving = serving
        self.guard = guard
        self.cfg = server_cfg
        self.tokens = TokenStore(server_cfg.auth) if server_cfg.auth.enabled else None
        responses = ResponsesServing(serving)
        self.apis = {
            "/v1/chat/completions": _Api(CHAT_METHOD, lambda body, rid: serving.check(
                validated(p.ChatCompletionRequest, body), rid), serving.completion, serving.stream),
            "/v1/responses": _Api(RESPONSES_METHOD, lambda body, rid: responses.check(
                validated(rp.ResponsesRequest, body), rid), responses.response, responses.stream),
        }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_request_bytes, middlewares=[self._middleware])
        app.router.add_get("/health", self._health)
        app.router.add_get("/health/ready", self._ready)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)  # backend names may hold '/' (org/name)
        for path in self.apis:
            app.router.add_post(path, self._call)
        stored = app.router.add_resource("/v1/responses/{tail:.*}")
        for method in ("GET", "POST", "DELETE"):  # retrieve, cancel, delete (not '*': CORS answers OPTIONS)
            stored.add_route(method, self._stored)
        allow_origins(app, self.cfg.http_cors_origins)
        return app

    # -- everything around a request ----------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        rid = request[_RID] = client_request_id(request.headers.get(REQUEST_ID, ""))
        token = request_id_var.set(rid)
        try:
            exempt = request.path.startswith(_EXEMPT) or request.method == "OPTIONS"  # probes, CORS preflights
            problem = None if exempt else self._auth(request)
            if problem:
                resp = _error(grpc.StatusCode.UNAUTHENTICATED, problem)
                api = self.apis.get(request.path) if request.method == "POST" else None
                if api is not None:  # a call refused; other paths are not calls
                    self.guard.done(api.method, "UNAUTHENTICATED", 0.0, rid, transport="http")
            else:
                resp = await handler(request)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large: OpenAI's error shape
            body = p.ErrorResponse(error=p.ErrorInfo(message=f"{request.method} {request.path}: {exc.reason}"
                                                     + (f" ({exc.text})" if exc.status in (403, 408, 413) else "")
                                                     + (f": {_NOT_SERVED[request.path]}" if exc.status == 404
                                                        and request.path in _NOT_SERVED else ""),
                                                     type="invalid_request_error"))
            resp = _json(body, exc.status, {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
        finally:
            request_id_var.reset(token)
        if not resp.prepared:
            resp.headers[REQUEST_ID] = rid
        return resp

    def _auth(self, request: web.Request) -> str | None:
        """What is wrong with the request's token, or None (the gRPC API's tokens and rules)."""
        if self.tokens is None:
            return None
        return bearer_problem(self.tokens, request.headers.get("Authorization", ""), "Authorization header",
                              "send the header 'Authorization: Bearer <token>' (the OpenAI SDK's api_key)")

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.Response:
        why = self.serving.engine.outage()  # what the gRPC health status of moaa.v1.MoAGateway follows
        if why is None:
            return web.json_response({"status": "ready"})
        if self._auth(request):   # probes carry no token: the names of recipes and models are for callers with one
            why = "no recipe can be answered now; send a token (Authorization: Bearer) to see which backends are out"
        return web.json_response({"status": "unavailable", "reason": why}, status=503)

    async def _models(self, request: web.Request) -> web.Response:
        return _json(self.serving.models())

    async def _model(self, request: web.Request) -> web.Response:
        try:
            return _json(self.serving.model(request.match_info["model"]))
        except HttpError as err:
            return _error(err.code, str(err), err.param)

    async def _stored(self, request: web.Request) -> web.Response:
        """Retrieving, deleting, cancelling a response or listing its input items: moaa keeps none."""
        return _json(p.ErrorResponse(error=p.ErrorInfo(
            message=f"{request.method} {request.path}: moaa stores no responses (store is accepted and ignored), so "
                    "there is none to retrieve, cancel or delete; keep the Response that POST /v1/responses "
                    "returned, and send the whole conversation in `input`", type="invalid_request_error",
            code="response_not_found")), 404)

    # -- calls: chat completions and responses -------------------------------------------------------

    async def _call(self, request: web.Request) -> web.StreamResponse:
        rid = request[_RID]
        api = self.apis[request.path]
        t0 = time.perf_counter()
        code, resp = grpc.StatusCode.OK, None
        try:
            await self._read_body(request)  # before the slot: a client slow to send holds none
            with self.guard.limiter.slot():
                resp = await self._answer(request, api, rid)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except web.HTTPException:
            code = grpc.StatusCode.INVALID_ARGUMENT  # e.g. 413 body too large; the middleware answers it
            raise
        except (ConnectionResetError, ConnectionError):
            code = grpc.StatusCode.CANCELLED  # the client hung up mid-stream
            resp = request.get(_STREAM) or web.Response(status=499)
        except Exception as err:  # noqa: BLE001 - every error becomes an OpenAI error body
            code, msg = status_of(err)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s call failed", api.method)
            resp = self._failed(request, code, msg, getattr(err, "param", None))
        finally:
            if isinstance(resp, _Streamed) and resp.error is not None:
                code = resp.error
            self.guard.done(api.method, code.name, time.perf_counter() - t0, rid, transport="http")
        return resp

    def _failed(self, request: web.Request, code: grpc.StatusCode, msg: str, param: str | None):
        stream = request.get(_STREAM)
        if stream is not None:  # the answer already started: the error goes in the stream
            stream.error = code
            return stream
        return _error(code, msg, param)

    async def _read_body(self, request: web.Request) -> None:
        """The whole body, within http_client_timeout_s (408 after it); request.read() then gives it from
        aiohttp's cache. Bodies over max_request_bytes are refused (413) by aiohttp's client_max_size."""
        try:
            await asyncio.wait_for(request.read(), self.cfg.http_client_timeout_s)
        except asyncio.TimeoutError:
            raise web.HTTPRequestTimeout(text=f"the request body did not arrive within "
                                              f"{self.cfg.http_client_timeout_s:g} s") from None

    async def _answer(self, request: web.Request, api: _Api, rid: str) -> web.StreamResponse:
        try:
            # orjson refuses what json would pass on to fail later, as a 500: a lone UTF-16 surrogate (which no
            # UTF-8 text, so no backend request, can hold) and nesting past 1,024 levels (RecursionError)
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as err:
            raise HttpError(f"the request body is not JSON ({err})", grpc.StatusCode.INVALID_ARGUMENT) from None
        started = time.monotonic()
        call = api.check(body, rid)
        if not call.request.stream:
            async with aclosing(self.serving.events(call, started, deltas=False)) as events:
                async for ev in events:
                    if ev.HasField("final"):
                        return _json(api.answer(call, ev.final), headers={REQUEST_ID: rid})
            raise RpcError("the engine ended without a result")
        return await self._stream(request, call, started, api.stream(call))

    async def _stream(self, request: web.Request, call: Call, started: float, sse) -> web.StreamResponse:
        """Headers go out with the first delta, or once nothing was sent for http_stream_keepalive_s (then an
        SSE comment each time as long again), so an error before them (too few proposers, deadline) still
        answers with its own status; after them, an error is an event in the stream (`sse.failed`)."""
        resp = _Streamed(headers={**_SSE_HEADERS, REQUEST_ID: call.plan.request_id})
        writing = asyncio.Lock()   # the keep-alive task writes too: one event's bytes at a time

        async def send(make, *args) -> None:  # called here, so the stream's start is numbered before them
            async with writing:
                if not resp.prepared:
                    await resp.prepare(request)
                    resp.watch(request.transport, self.cfg.http_client_timeout_s)
                    request[_STREAM] = resp
                    for chunk in sse.start():
                        await resp.write(chunk)
                for chunk in make(*args):
                    await resp.write(chunk)

        keepalive = self._keepalive(resp, send)
        try:
            async with aclosing(self.serving.events(call, started, deltas=True)) as events:
                async for ev in events:
                    if ev.HasField("delta"):
                        await send(sse.delta, ev.delta.text)
                    elif ev.HasField("final"):
                        await send(sse.final, ev.final)
        except RpcError as err:
            await _stopped(keepalive)   # first: it may be sending the headers right now
            if not resp.prepared:
                raise
            code, msg = status_of(err)
            resp.error = code
            await send(sse.failed, code, msg)
        finally:
            await _stopped(keepalive)
        await send(sse.end)
        await resp.write_eof()
        return resp

    def _keepalive(self, resp: "_Streamed", send) -> asyncio.Task | None:
        """A task that sends an SSE comment (which every SSE parser skips) whenever the stream has been
        silent for http_stream_keepalive_s, the first one with the headers."""
        every = self.cfg.http_stream_keepalive_s
        if every is None:
            return None

        async def beat() -> None:
            while True:
                idle = asyncio.get_running_loop().time() - resp.last_write
                if idle < every:
                    await asyncio.sleep(every - idle)
                    continue
                try:
                    await send(lambda: [b": keep-alive\n\n"])
                except (ConnectionError, RuntimeError):   # the client is gone: the handler's write finds out too
                    return

        return asyncio.create_task(beat())


async def _stopped(task: asyncio.Task | None) -> None:
    """Cancel a task and wait until it has ended (its last write done or undone)."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _Streamed(web.StreamResponse):
    """A streamed answer; `error` is the status code of an error sent inside it. A write its client takes
    nothing of for `timeout_s` (the kernel's and aiohttp's buffers full) drops the connection: a client
    that never reads would hold an in-flight slot and, through the paused engine, a backend request."""

    error: grpc.StatusCode | None = None
    _transport = None
    _timeout_s: float | None = None

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.last_write = asyncio.get_running_loop().time()   # made when the call starts: silent since then

    def watch(self, transport, timeout_s: float | None) -> None:
        self._transport, self._timeout_s = transport, timeout_s

    async def write(self, data) -> None:
        self.last_write = asyncio.get_running_loop().time()
        if self._transport is None or self._timeout_s is None:
            return await super().write(data)
        # abort, not close: close() would wait for the unread buffer to be sent. The waiting write then
        # fails with ConnectionResetError, the hung-up client's path in _chat (engine closed, CANCELLED).
        timer = asyncio.get_running_loop().call_later(self._timeout_s, self._transport.abort)
        try:
            await super().write(data)
        finally:
            timer.cancel()


def ssl_context(cfg: GatewayConfig) -> ssl.SSLContext | None:
    """The gRPC port's certificate for HTTPS too; with client_ca_file, client certificates are required."""
    if not cfg.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
    if cfg.tls.client_ca_file:
        ctx.load_verify_locations(cfg.tls.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start_http(router: OpenAIRouter, host: str, port: int, grace_s: float):
    """Serve the router; returns (runner, bound port). `runner.cleanup()` waits up to grace_s for calls."""
    # keepalive_timeout also bounds a connection's wait for its first request's headers (aiohttp's
    # default, an hour, let a client hold a connection with a header line now and then: slowloris)
    runner = web.AppRunner(router.app(), handler_cancellation=True, access_log=None, shutdown_timeout=grace_s,
                           keepalive_timeout=router.cfg.http_client_timeout_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context(router.cfg), backlog=2048)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    log.info("OpenAI-compatible HTTP on %s:%d%s", host, bound, " (TLS)" if router.cfg.tls.enabled else "")
    return runner, bound
