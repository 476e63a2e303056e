"""The emulator's HTTP transport (aiohttp): OpenAI-compatible routes plus /emulator/* for tests.

    GET  /health                 -> settings.health_status (200 even while a model stalls, like vLLM)
    GET  /v1/models
    POST /v1/chat/completions    streamed (SSE) or not, n supported
    GET  /emulator/stats         counters, disconnects seen, last request bodies per model
    POST /emulator/reset         clears the stats
    PATCH /emulator/settings     changes server settings (JSON object of EmulatorSettings fields)
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
import weakref

from aiohttp import web

from moaa.services.backend.attempt import PROBE_HEADER

from .protocol import (OVERRIDE_HEADER, EmulatorSettings, OverrideError, context_refusal, effective_settings,
                       error_body, header_overrides, retry_headers, split_model, validate_chat)
from .judge import judge_timing
from .serving import ChatServing, EmulatorStats, count_prompt_tokens

log = logging.getLogger("moaa.emulator")


def _error(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.json_response(error_body(message, status), status=status, headers=headers)


class Emulator:
    """An in-process emulator server. `profiles` maps a model name to its own setting overrides."""

    def __init__(self, settings: EmulatorSettings | None = None, profiles: dict[str, dict] | None = None,
                 models: list[str] | None = None):
        self.serving = ChatServing(settings or EmulatorSettings())
        self.profiles = dict(profiles or {})
        self.models = list(models or ["emulator"])
        self._runner: web.AppRunner | None = None
        self._idle_since: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> last answer's end
        self.host = "127.0.0.1"
        self.port = 0

    # -- Python API for tests ------------------------------------------------------------------
    @property
    def settings(self) -> EmulatorSettings:
        return self.serving.settings

    @property
    def stats(self) -> EmulatorStats:
        return self.serving.stats

    @property
    def url(self) -> str:
        """Base URL as a backend config wants it (…/v1)."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def update(self, **fields) -> None:
        self.serving.settings = effective_settings(self.serving.settings, fields)

    def reset(self) -> None:
        self.serving.reset()

    def bodies(self, model: str) -> list[dict]:
        return list(self.stats.bodies.get(model, ()))

    # -- server ----------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/emulator/stats", self._stats)
        app.router.add_post("/emulator/reset", self._reset)
        app.router.add_patch("/emulator/settings", self._settings)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        # handler_cancellation: a client that hangs up cancels its handler, which is how a stalled
        # request notices the disconnect.
        # keepalive_race: the server's own idle close never comes first; a late request meets it instead
        keepalive = 3600.0 if self.settings.keepalive_race else self.settings.keepalive_timeout_s
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=0.5, keepalive_timeout=keepalive)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        site = web.SockSite(self._runner, sock, backlog=2048)
        await site.start()
        self.host, self.port = host, sock.getsockname()[1]
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "Emulator":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- handlers --------------------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=self.settings.health_status)

    async def _models(self, request: web.Request) -> web.Response:
        names = list(dict.fromkeys([*self.models, *self.profiles]))
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "moaa-emulator", "max_model_len": 4096} for m in names]})

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_dict())

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _settings(self, request: web.Request) -> web.Response:
        try:
            fields = await request.json()
            if not isinstance(fields, dict):
                raise OverrideError("settings must be a JSON object")
            self.update(**fields)
        except (ValueError, OverrideError) as err:
            return _error(400, str(err))
        return web.json_response(self.settings.model_dump())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        transport, s = request.transport, self.settings
        idle_since = self._idle_since.get(transport) if transport is not None else None
        if s.keepalive_race and idle_since is not None and time.monotonic() - idle_since >= s.keepalive_timeout_s:
            self.stats.faults["keepalive_race"] += 1
            transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        try:
            return await self._chat_answer(request)
        finally:
            if transport is not None and not transport.is_closing():
                self._idle_since[transport] = time.monotonic()

    async def _chat_answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not JSON")
        problem = validate_chat(body)
        if problem:
            return _error(400, problem)
        try:
            base, suffix = split_model(body["model"])
            s = effective_settings(self.settings, self.profiles.get(base, {}), suffix,
                                   header_overrides(request.headers.get(OVERRIDE_HEADER)))
        except OverrideError as err:
            return _error(400, f"emulator override: {err}")
        serving = self.serving
        serving.stats.authorization = request.headers.get("Authorization")
        if s.api_key is not None and serving.stats.authorization != f"Bearer {s.api_key}":
            return _error(401, "invalid or missing API key")
        probe = bool(request.headers.get(PROBE_HEADER))  # moaa's health probes, counted apart from real requests
        serving.record(base, body, probe, s)
        if s.reject_max_tokens and "max_tokens" in body:
            return web.json_response({"error": {
                "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                           "Use 'max_completion_tokens' instead.", "type": "invalid_request_error",
                "param": "max_tokens", "code": "unsupported_parameter"}}, status=400)
        refusal = context_refusal(body, count_prompt_tokens(body), s.max_model_len)
        if refusal:
            return _error(400, refusal)
        if s.judge:
            s = judge_timing(s, base)
        status = serving.draw_error(s)
        if status is not None:
            headers = retry_headers(s) if status in (429, 503) else None
            return _error(status, f"emulated {status} error", headers)
        cap = serving.capacity(base, s)
        if cap is not None and s.overflow == "reject" and cap.active >= cap.limit:
            serving.stats.rejected += 1
            return _error(429, f"model {base!r} is at its concurrency cap ({cap.limit}); retry later")
        finished = False
        serving.begin(None if probe else base)
        try:
            if cap is not None:
                if s.overflow == "queue":
                    await cap.sem.acquire()
                cap.active += 1
            t0 = time.monotonic()
            try:
                result, finished = await self._respond(request, body, s)
                return result
            finally:
                serving.served(None if probe else base, time.monotonic() - t0)
                if cap is not None:
                    cap.active -= 1
                    if s.overflow == "queue":
                        cap.sem.release()
        except (asyncio.CancelledError, ConnectionResetError):
            serving.stats.disconnects += 1
            raise
        finally:
            serving.end(None if probe else base)
            if finished:
                serving.stats.completed += 1

    async def _respond(self, request: web.Request, body: dict, s: EmulatorSettings) -> tuple[web.StreamResponse, bool]:
        """The response, and whether the answer went out in full."""
        serving = self.serving
        if s.stall_before_headers:
            await serving.stall(s, "stall_before_headers")
        if s.html_200:
            serving.stats.faults["html_200"] += 1
            return web.Response(text="<html><body><h1>Sign in to continue</h1></body></html>",
                                content_type="text/html"), False
        if s.error_200:
            serving.stats.faults["error_200"] += 1
            return web.json_response(error_body("upstream model server overloaded (emulated)", 502)), False
        if not body.get("stream") or s.ignore_stream:
            if s.stall_after_chunks is not None:
                await serving.stall(s, "stall_after_chunks")
            if s.disconnect_after_chunks is not None:
                serving.stats.faults["disconnect"] += 1
                request.transport.abort()
                return web.Response(status=500), False  # never sent: the connection is gone
            if s.malformed_after_chunks is not None:
                serving.stats.faults["malformed"] += 1
                return web.Response(body=b'{"id": "chatcmpl-x", "choices": [', content_type="application/json"), False
            resp = web.json_response(await serving.answer(body, body["model"], s))
            if s.gzip:
                resp.enable_compression(web.ContentCoding.gzip)
            return resp, True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        if s.gzip:
            resp.enable_compression(web.ContentCoding.gzip)
        await resp.prepare(request)
        write = _split_writer(resp.write) if s.split_writes else resp.write

        def cut() -> None:
            transport = request.transport
            if transport is not None:
                transport.abort()

        complete = await serving.stream(body, body["model"], s, write, cut)
        if request.transport is None or request.transport.is_closing():
            return resp, False  # dropped on purpose (disconnect / malformed fault)
        await resp.write_eof()
        return resp, complete


def _split_writer(write):
    """Each event in two writes a moment apart, cut inside its first multi-byte UTF-8 character (else in the
    middle), so that a reader gets the halves in separate reads."""

    async def split(data: bytes) -> None:
        cut = next((i + 1 for i, b in enumerate(data) if b >= 0xC0), len(data) // 2)
        await write(data[:cut])
        await asyncio.sleep(0.005)
        await write(data[cut:])

    return split


async def run_emulator(settings: EmulatorSettings, profiles: dict[str, dict] | None = None,
                       models: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serves until cancelled (`moaa backend emulate`: SIGINT/SIGTERM cancel the main task)."""
    emulator = Emulator(settings, profiles, models)
    await emulator.start(host, port)
    print(f"moaa emulator listening on {emulator.url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
    return 0
