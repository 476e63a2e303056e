"""The OpenAI-compatible client of one backend (model): retries, failover, timeouts, streaming (one request
to one replica: attempt.py).

Every request is streamed from the backend (usage asked for in the stream) so that a hung engine is
caught by the first-token and chunk-gap timeouts even when the caller wants the whole answer at once.
"""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

import aiohttp

from moaa.services.backend.config import BackendConfig, SamplingConfig, nth_seed

from .attempt import attempt_once
from .errors import BackendError
from .limits import make_throttler
from .protocol import RESTART as _RESTART
from .protocol import ChatChoice, ChatResult, Usage, chat_body, sampling_dict
from .replicas import Replica, ReplicaSet
from .stream import ChatStream

log = logging.getLogger("moaa.backend")

# Idle pooled connections are dropped before uvicorn's (vLLM, SGLang) 5 s keep-alive closes them: a request
# sent on a connection as the server closes it fails unanswered (aiohttp's default keeps them 15 s).
KEEPALIVE_S = 4.0


def normalize_messages(messages) -> list[dict]:
    """Chat turns as plain dicts; accepts dicts or objects with role/content (e.g. moaa.v1.Message)."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            d = {"role": m["role"], "content": m["content"]}
            if m.get("name"):
                d["name"] = m["name"]
        else:
            d = {"role": m.role, "content": m.content}
            if getattr(m, "name", ""):
                d["name"] = m.name
        out.append(d)
    if not out:
        raise ValueError("messages must not be empty")
    return out


class BackendClient:
    """Calls one backend by its config name. Obtain it from BackendPool.client(name)."""

    def __init__(self, name: str, cfg: BackendConfig, api_key: str | None = None):
        self.name = name
        self.cfg = cfg
        self.served_model = cfg.served_model or name
        self.replicas = ReplicaSet(name, cfg)
        self.throttler = make_throttler(cfg.rate_limit_per_s)
        self._throttle_lock = asyncio.Lock()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self.queued = 0  # requests waiting for a rate-limit token or a replica slot (bounded by max_queued)
        self.on_release: list = []  # called when a request gives its slot back (Admission listens)

    @property
    def capacity(self) -> int:
        """Requests the replicas take at once now (their adaptive limits)."""
        return sum(r.limit.limit for r in self.replicas.replicas)

    @property
    def available(self) -> bool:
        """Some replica takes requests (not every circuit is open)."""
        return any(r.available() for r in self.replicas.replicas)

    # -- session -------------------------------------------------------------------------------
    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"backend client {self.name!r} is closed")
        if self._session is None or self._session.closed:
            per_replica = self.cfg.max_concurrency + 2  # + probes
            connector = aiohttp.TCPConnector(limit=per_replica * len(self.cfg.urls), limit_per_host=per_replica,
                                             ttl_dns_cache=60, keepalive_timeout=KEEPALIVE_S)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, read_bufsize=1 << 20, raise_for_status=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.timeouts.connect_s))
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public API ----------------------------------------------------------------------------
    async def chat(self, messages, sampling: SamplingConfig | dict | None = None, n: int = 1,
                   timeout: float | None = None, partial_ok: bool = False,
                   progress: dict | None = None) -> ChatResult:
        """The whole answer (n choices). Raises BackendError. Where n is sent as separate requests,
        partial_ok=True returns the choices that answered (each keeps its index) and lists the failed
        ones' errors in `failures`; it raises only when none answered. `progress` (n=1), a dict, is kept up
        to date while the call runs: endpoint, attempts, error (the last failed attempt's BackendError) and
        usage (once the answer was received whole), for a caller that may cancel the call to report it."""
        if n < 1:
            raise ValueError("n must be at least 1")
        msgs = normalize_messages(messages)
        params = sampling_dict(sampling)
        deadline = self._deadline(timeout)
        if n > 1 and not self.cfg.supports_n:
            return await self._chat_emulated_n(msgs, params, n, deadline, partial_ok)
        res = await self._chat_once(self._body(msgs, params, n), n, deadline, progress)
        got = sum(1 for c in res.choices if c.finish_reason is not None or c.text)
        if got < n:  # a server that ignores n (supports_n misconfigured): ask for the rest one by one
            rest = {**params, "seed": nth_seed(params["seed"], got)} if "seed" in params else params
            try:  # partial_ok: the choices already here stay, whatever the extra requests do
                extra = await self._chat_emulated_n(msgs, rest, n - got, deadline, partial_ok)
            except BackendError as err:
                if not partial_ok:
                    raise
                extra = ChatResult(model=self.name, endpoint="", choices=[], failures=[err] * (n - got))
            if got == 1:
                res.choices[0].usage = res.usage
            res.choices = res.choices[:got] + [ChatChoice(got + c.index, c.text, c.finish_reason, c.usage)
                                               for c in extra.choices]
            res.usage = res.usage + extra.usage
            res.failures = res.failures + extra.failures
            res.note = (f"backend returned {got} of {n} choices; {n - got} more requested separately"
                        + (f", {len(extra.failures)} of them failed" if extra.failures else ""))
            log.warning("backend %s ignored n=%d; set supports_n: false in its config", self.name, n)
        return res

    def stream_chat(self, messages, sampling: SamplingConfig | dict | None = None,
                    timeout: float | None = None) -> ChatStream:
        """Text deltas as the backend sends them; the last chunk carries usage. Retries and failover
        happen only before the first chunk reaches the caller. Raises BackendError while iterating."""
        body = self._body(normalize_messages(messages), sampling_dict(sampling))
        return ChatStream(self, body, self._deadline(timeout))

    async def probe(self, replica: Replica) -> float:
        """A real tiny completion on one replica, bypassing limits; returns its latency."""
        h = self.cfg.health
        body = self._body([{"role": "user", "content": "Hi"}],
                          {"max_tokens": h.probe_max_tokens, "temperature": 0.0})
        t0 = time.monotonic()
        deadline = asyncio.get_running_loop().time() + h.probe_timeout_s
        async with aclosing(attempt_once(self, replica, body, deadline, probe=True)) as events:
            async for _ in events:
                pass
        return time.monotonic() - t0

    # -- internals -----------------------------------------------------------------------------
    def _body(self, messages: list[dict], sampling: dict, n: int = 1) -> dict:
        return chat_body(self.served_model, messages, sampling, n, self.cfg.max_tokens_field)

    @staticmethod
    def _deadline(timeout: float | None) -> float:
        if timeout is not None and timeout <= 0:
            timeout = 0.0
        return math.inf if timeout is None else asyncio.get_running_loop().time() + timeout

    async def _chat_once(self, body: dict, n: int, deadline: float, state: dict | None = None) -> ChatResult:
        t0 = time.monotonic()
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage = Usage()
        ttft = None
        state = {} if state is None else state
        async with aclosing(self._events(body, deadline, state)) as events:
            async for batch in events:
                if batch is _RESTART:
                    texts, finish, usage, ttft = {}, {}, Usage(), None
                    state.pop("usage", None)
                    continue
                if ttft is None:
                    ttft = time.monotonic() - t0
                for ev in batch:
                    for ch in ev.get("choices") or ():
                        i = ch.get("index", 0)
                        delta = ch.get("delta")
                        piece = (delta and delta.get("content")) or ch.get("text")
                        if piece:
                            texts.setdefault(i, []).append(piece)
                        if ch.get("finish_reason"):
                            finish[i] = ch["finish_reason"]
                    if ev.get("usage"):
                        usage = state["usage"] = Usage.from_dict(ev["usage"])  # the answer's last chunk
        choices = [ChatChoice(i, "".join(texts.get(i, [])), finish.get(i)) for i in range(n)]
        if n == 1:  # one choice: the request's usage is its own (n choices share one usage)
            choices[0].usage = usage
        return ChatResult(model=self.name, endpoint=state.get("endpoint", ""), choices=choices, usage=usage,
                          latency_s=time.monotonic() - t0, ttft_s=ttft, attempts=state.get("attempts", 1))

    async def _chat_emulated_n(self, msgs: list[dict], params: dict, n: int, deadline: float,
                               partial_ok: bool = False) -> ChatResult:
        t0 = time.monotonic()
        if n == 1:
            return await self._chat_once(self._body(msgs, params), 1, deadline)

        def params_for(i: int) -> dict:
            # Same seed n times would give n identical answers.
            return {**params, "seed": nth_seed(params["seed"], i)} if "seed" in params else params

        tasks = [asyncio.create_task(self._chat_once(self._body(msgs, params_for(i)), 1, deadline))
                 for i in range(n)]
        try:
            # all-or-nothing: the first failure ends the call; partial_ok: wait for every request
            done, _ = await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED if partial_ok
                                         else asyncio.FIRST_EXCEPTION)
            errors = [t.exception() for t in tasks if t.done() and t.exception() is not None]
            if errors and len(errors) == n:
                raise errors[0]
            fatal = [e for e in errors if not (partial_ok and isinstance(e, BackendError))]
            if fatal:
                raise fatal[0]
        finally:  # stop whatever still runs (a failure, or the caller went away)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        answered = [(i, t.result()) for i, t in enumerate(tasks) if t.exception() is None]
        results = [r for _, r in answered]
        usage = Usage()
        for r in results:
            usage = usage + r.usage
        ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
        return ChatResult(
            model=self.name, endpoint=",".join(sorted({r.endpoint for r in results})),
            choices=[ChatChoice(i, r.text, r.finish_reason, r.usage) for i, r in answered], usage=usage,
            latency_s=time.monotonic() - t0, ttft_s=min(ttfts) if ttfts else None,
            note=f"n emulated with {n} requests (backend {self.name!r} has supports_n: false)"
                 + (f"; {len(errors)} of them failed" if errors else ""),
            attempts=max(r.attempts for r in results), failures=errors)

    async def _events(self, body: dict, deadline: float, state: dict) -> AsyncIterator[Any]:
        """Parsed stream events in lists (those of one read), with retries and failover until the consumer sets state['committed'];
        a retry after events were passed on is announced by a _RESTART marker so the consumer starts
        over. Sets state['endpoint'], state['attempts'] and state['error'] (the last failed attempt)."""
        loop = asyncio.get_running_loop()
        retry = self.cfg.retries
        tried: set[str] = set()
        attempt = 0
        while True:
            attempt += 1
            state["attempts"] = attempt
            passed_on = False
            replica = self.replicas.pick(tried)
            try:
                if replica is None:
                    # no replica was reached, so no endpoint (common.proto); the message names them
                    raise BackendError(self.name, "", "circuit_open",
                                       f"every replica's circuit breaker is open ({', '.join(self.cfg.urls)})")
                state["endpoint"] = replica.url
                tried.add(replica.url)
                async with aclosing(attempt_once(self, replica, body, deadline)) as events:
                    async for batch in events:
                        passed_on = True
                        yield batch
                return
            except BackendError as err:
                err.attempts = attempt
                state["error"] = err  # what a caller that cancels us while we wait to retry reports
                # stream_chat marks state['committed'] once the caller has seen a chunk: no retry after that
                if state.get("committed") or not err.retryable or attempt >= retry.max_attempts:
                    raise
                delay = random.uniform(0, min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (attempt - 1)))
                # the wait a 429 or 503 asks for, within our own bound
                delay = max(delay, min(getattr(err, "retry_after", 0.0), retry.backoff_max_s))
                if loop.time() + delay >= deadline:
                    raise
                log.info("backend %s: attempt %d failed (%s at %s), retrying in %.2fs",
                         self.name, attempt, err.cause, err.endpoint, delay)
                await asyncio.sleep(delay)
                if passed_on:
                    yield _RESTART
