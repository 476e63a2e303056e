"""One request to one replica of a backend: admission (the backend's queue bound, rate limit and the
replica's concurrency slot), the POST, and what comes back classified: parsed stream events, or one
typed BackendError naming the cause (which also feeds the replica's circuit and adaptive limit).
Retries and failover across replicas are the client's (client.py)."""
from __future__ import annotations

import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING, AsyncIterator

import aiohttp
import orjson

from .errors import REPLICA_FAULTS, BackendError, error_message, retry_after
from .limits import ITEM_STARTED
from .replicas import Replica
from .sse import DONE, MalformedEvent, SSEParser, check_chat_chunk

if TYPE_CHECKING:
    from .client import BackendClient

if sys.version_info >= (3, 11):
    from asyncio import timeout_at
else:  # asyncio.timeout_at is 3.11+; async-timeout is its backport (same loop-time deadline)
    from async_timeout import timeout_at

# asyncio.TimeoutError, not the builtin: on 3.10 they differ, and the backport's timeouts and aiohttp's
# ServerTimeoutError are asyncio's (on 3.11+ the two names are one class)

log = logging.getLogger("moaa.backend")

PROBE_HEADER = "X-Moaa-Probe"
_JSON = {"Content-Type": "application/json"}
_PROBE_JSON = {**_JSON, PROBE_HEADER: "1"}


async def attempt_once(client: "BackendClient", replica: Replica, body: dict, deadline: float,
                       probe: bool = False) -> AsyncIterator[list[dict]]:
    """One request to one replica, as lists of parsed SSE events (those of one read). Raises BackendError naming the cause."""
    loop = asyncio.get_running_loop()
    t = client.cfg.timeouts
    start = loop.time()
    attempt_deadline = min(start + t.total_s, deadline)
    name, url = client.name, replica.url

    def fail(cause: str, message: str, status: int = 0) -> BackendError:
        return BackendError(name, url, cause, message, status)

    def not_sent(cause: str, message: str) -> BackendError:
        # failed in our own queue: no replica was reached, so no endpoint (common.proto), and no replica fault
        err = BackendError(name, "", cause, message)
        err.replica_fault = False
        return err

    sent = start  # first-token time counts from sending, not from waiting in our own queue

    def timed_out(phase_deadline: float, phase: str) -> BackendError:
        if phase_deadline >= deadline:
            err = fail("timeout", f"caller's deadline passed during {phase}")
            err.replica_fault = False  # a short deadline says nothing about the replica
            return err
        if phase_deadline >= start + t.total_s:
            return fail("timeout", f"request exceeded total_s={t.total_s}s")
        limits = {"first token": f"no first token within first_token_s={t.first_token_s}s",
                  "chunk gap": f"no chunk within chunk_gap_s={t.chunk_gap_s}s",
                  "error body": "error body not read in time"}
        return fail("timeout", limits.get(phase, phase))

    if loop.time() >= deadline:
        raise not_sent("timeout", "caller's deadline passed during queueing")
    trial = replica.begin() if not probe else False
    slot = False
    epoch = 0
    resp: aiohttp.ClientResponse | None = None
    outcome: str | None = None  # "ok" | fault cause | None (caller went away)
    reusable = False
    try:
        if not probe:
            # a request waits when no slot is free, or behind the rate limit's queue (its FIFO lock)
            if client.queued >= client.cfg.max_queued and (not replica.limit.free or client.throttler is not None):
                raise not_sent("queue_full", f"{client.queued} requests already wait for this backend "
                               f"(max_queued={client.cfg.max_queued}); send fewer at once or raise max_queued")
            client.queued += 1
            started = ITEM_STARTED.get()
            if started is not None:
                started.set()
            try:
                async with timeout_at(attempt_deadline):
                    if replica.in_flight == 0:
                        replica.progress()  # an idle replica has no stalled requests
                    await replica.limit.acquire()
                    slot = True
                    epoch = replica.limit.epoch
                    if client.throttler is not None:
                        # the rate token last, right before sending: tokens taken while waiting for a slot
                        # would all be spent at once when slots free together, past the rate.
                        # asyncio-throttle polls; one poller at a time (FIFO) instead of every waiter
                        async with client._throttle_lock:
                            await client.throttler.acquire()
            except asyncio.TimeoutError:
                if attempt_deadline >= deadline:
                    raise not_sent("timeout", "caller's deadline passed while waiting for a concurrency slot / "
                                   "rate-limit token") from None
                raise not_sent("timeout", f"no free concurrency slot / rate-limit token within total_s="
                               f"{t.total_s}s") from None
            finally:
                client.queued -= 1
            sent = loop.time()
        # encoded once here with orjson: aiohttp's json= costs a stdlib dumps and a payload wrapper
        payload, headers = _dumps(body), (_PROBE_JSON if probe else _JSON)
        phase, phase_deadline = "first token", min(sent + t.first_token_s, attempt_deadline)
        try:
            async with timeout_at(phase_deadline):
                resp = await client._ensure_session().post(f"{url}/chat/completions", data=payload, headers=headers)
        except asyncio.TimeoutError as e:
            if isinstance(e, aiohttp.ServerTimeoutError):
                raise fail("connect", f"connect timed out after connect_s={t.connect_s}s") from None
            raise timed_out(phase_deadline, phase) from None
        except aiohttp.ClientConnectorError as e:
            raise fail("connect", f"cannot connect: {e.os_error.strerror or e.os_error}") from None
        except aiohttp.ClientError as e:
            raise fail("connect", f"{type(e).__name__}: {e}") from None
        if resp.status != 200:
            try:
                async with timeout_at(min(loop.time() + 5.0, attempt_deadline)):
                    raw = await resp.read()
            except (asyncio.TimeoutError, aiohttp.ClientError):
                raw = None
            reusable = raw is not None  # the error body was read whole: keep the connection
            raw = raw or b""
            msg = error_message(raw) if raw else resp.reason or "no error body"
            if resp.status == 429:
                if slot:
                    replica.limit.on_rate_limited(epoch)
                err = fail("rate_limited", msg, 429)
            else:
                if resp.status == 404 and not url.endswith("/v1"):  # likely a base URL without its API path
                    msg += f" (POST {url}/chat/completions: is {url} the API base? it usually ends in /v1)"
                err = fail("http_5xx" if resp.status >= 500 else "http_4xx", msg, resp.status)
            err.retry_after = retry_after(resp.headers)
            raise err
        if resp.content_type == "application/json":  # a server that ignored stream=true
            try:
                async with timeout_at(phase_deadline):
                    whole = await resp.read()
            except asyncio.TimeoutError:
                raise timed_out(phase_deadline, phase) from None
            except aiohttp.ClientError as e:
                raise fail("stream_cut", f"response cut short: {_short(e)}") from None
            yield [_as_event(whole, fail)]
            outcome = "ok"
            return
        parser = SSEParser()
        finished = done = seen = False
        while not done:
            try:
                async with timeout_at(phase_deadline):
                    data = await resp.content.readany()  # all that arrived: fewer wakeups than per line
            except asyncio.TimeoutError:
                raise timed_out(phase_deadline, phase) from None
            except aiohttp.ClientPayloadError as e:
                raise fail("stream_cut", f"stream cut short: {_short(e)}") from None
            except (aiohttp.ClientError, ConnectionError) as e:
                raise fail("stream_cut", f"stream cut short: {type(e).__name__}: {_short(e)}") from None
            replica.progress()
            try:
                events = parser.feed(data) if data else parser.close()
            except MalformedEvent as e:
                raise fail("malformed", str(e)) from None
            seen = seen or bool(events)
            # the events of one read are checked, then passed on as one list: one wakeup of the
            # consumer per read, not one per chunk (most answers arrive in a read or two)
            batch: list[dict] = []
            failure: BackendError | None = None
            for ev in events:
                if ev is DONE:
                    done = True
                    break
                failure = _error_object(ev, fail, "error in stream")
                if failure is not None:
                    break
                try:
                    check_chat_chunk(ev)
                except MalformedEvent as e:
                    failure = fail("malformed", str(e))
                    break
                if not finished:
                    for c in ev.get("choices") or ():
                        if c.get("finish_reason"):
                            finished = True
                batch.append(ev)
            if batch:  # what came before a failure still reaches the caller, as it did chunk by chunk
                phase = "chunk gap"
                yield batch
                phase_deadline = min(loop.time() + t.chunk_gap_s, attempt_deadline)
            if failure is not None:
                raise failure
            if not data and not done:
                if finished:  # some servers end without [DONE]; a finished answer is complete
                    break
                if not seen:  # not the protocol at all (a proxy's page), rather than a stream cut short
                    raise fail("malformed", f"200 answer of type {resp.content_type or 'unknown'} carried no "
                               "server-sent events: is the URL an OpenAI-compatible /v1 endpoint?")
                raise fail("stream_cut", "stream ended before the answer finished")
        outcome = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure leaves as one typed BackendError
        err = exc if isinstance(exc, BackendError) else fail(
            "stream_cut" if resp is not None else "connect", f"{type(exc).__name__}: {_short(exc)}")
        outcome = err.cause
        if err.cause in REPLICA_FAULTS and getattr(err, "replica_fault", True):
            replica.record_failure(f"{err.cause}: {err.message}")
        log.debug("backend %s replica %s: %s", name, url, err.cause)
        if err is exc:
            raise
        raise err from exc
    finally:
        if resp is not None:
            if outcome == "ok" or reusable:
                resp.release()
            else:
                resp.close()  # drop the connection: the server sees the disconnect
        if slot:
            replica.limit.release()
            for notify in client.on_release:
                notify()
        if outcome == "ok" and not probe:
            # a probe's success settles only a half-open circuit (health.py): "Hi" answered says little
            # about real requests, so it neither closes an open circuit early nor clears a failure streak
            replica.limit.on_success()
            replica.record_success()
        if trial:  # an abandoned trial (caller went away) leaves the circuit half-open for the next
            replica.end_trial()


def _error_object(ev: dict, fail, where: str) -> BackendError | None:
    """The backend's error when `ev` is an OpenAI error object (in a stream, or a whole 200 answer), with its
    message and the status its code names (500 when it names none), else None."""
    if not isinstance(ev, dict) or not ("error" in ev or ev.get("object") == "error") or ev.get("choices"):
        return None
    e = ev.get("error", ev)
    code = e.get("code") if isinstance(e, dict) else None
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return fail("http_5xx" if status >= 500 else "http_4xx", f"{where}: " + error_message(json.dumps(ev)), status)


def _as_event(raw: bytes, fail) -> dict:
    """A non-streamed chat completion, reshaped as one stream event."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise fail("malformed", "response is not a chat completion") from None
    error = _error_object(obj, fail, "error in a 200 answer")
    if error is not None:  # some proxies and servers answer an error with 200
        raise error
    try:
        choices = [{"index": c.get("index", 0), "delta": {"content": (c.get("message") or {}).get("content") or ""},
                    "finish_reason": c.get("finish_reason")} for c in obj["choices"]]
        return check_chat_chunk({"choices": choices, "usage": obj.get("usage")})
    except MalformedEvent as e:
        raise fail("malformed", f"response is not a chat completion: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise fail("malformed", "response is not a chat completion") from None


def _dumps(body: dict) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # what orjson refuses (integers over 64 bits) the stdlib still writes
        return json.dumps(body).encode()


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
