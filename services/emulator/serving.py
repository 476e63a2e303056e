"""What the emulator does for one chat request: deterministic text, timing, and injected faults.

Cheap by design (the gateway benchmark pushes hundreds of concurrent streams through one process):
text is drawn once per request from a fixed vocabulary, and time passes in asyncio sleeps only.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from .judge import Policy, judge_reply
from .protocol import EmulatorSettings, chunk, completion, error_body, split_model

VOCAB = ("the", "model", "answer", "is", "a", "mixture", "of", "agents", "that", "proposes", "and", "aggregates",
         "responses", "with", "care", "data", "quality", "improves", "when", "judges", "agree", "on", "better",
         "reasons", "for", "each", "step", "we", "check", "facts", "then", "write", "clearly", "so", "users", "learn",
         "more", "about", "training", "small", "models", "from", "large", "ones", "by", "preference", "pairs", "it")


def generate_tokens(body: dict, index: int, count: int) -> list[str]:
    """Deterministic tokens: the same messages, seed and choice index give the same text."""
    key = json.dumps([body.get("messages"), body.get("seed"), index], sort_keys=True, default=str)
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    words = rng.choices(VOCAB, k=count)
    return [words[0]] + [" " + w for w in words[1:]]


def text_tokens(text: str, limit: int | None) -> list[str]:
    """`text` cut into word tokens (whitespace kept), at most `limit`."""
    tokens = re.findall(r"\s*\S+", text) or [""]
    return tokens[:limit] if limit else tokens


def echo_tokens(body: dict, limit: int | None) -> list[str]:
    """The request's messages as `role: content` lines, cut into word tokens (whitespace kept)."""
    return text_tokens("\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in body.get("messages", [])), limit)


def cut_at_stop(tokens: list[str], stop) -> tuple[list[str], bool]:
    """vLLM's rule for `stop`: the answer ends just before the first stop string, which is not sent."""
    stops = [stop] if isinstance(stop, str) else [x for x in stop or () if x]
    text = "".join(tokens)
    at = min((i for i in (text.find(x) for x in stops) if i >= 0), default=-1)
    if at < 0:
        return tokens, False
    out, n = [], 0
    for t in tokens:
        if n + len(t) >= at:
            out += [t[:at - n]] if at > n else []
            break
        out.append(t)
        n += len(t)
    return out, True


def expected_text(body: dict, index: int = 0, max_tokens: int | None = None, default_max_tokens: int = 16) -> str:
    """The text the emulator answers to `body` (for tests)."""
    count = max_tokens or body.get("max_tokens") or default_max_tokens
    return "".join(cut_at_stop(generate_tokens(body, index, count), body.get("stop"))[0])


def count_prompt_tokens(body: dict) -> int:
    return sum(len(str(m.get("content", "")).split()) + 1 for m in body.get("messages", []))


@dataclass
class ModelStats:
    """One model's load: how busy its backend was (judge benchmarks read busy and slot time)."""
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    busy_s: float = 0.0           # wall time with at least one request in flight
    slot_s: float = 0.0           # integral of in-flight requests over time
    served_s: float = 0.0         # slot-seconds spent answering (slot taken to answer sent), queueing excluded
    _mark: float = 0.0

    def change(self, delta: int) -> None:
        now = time.monotonic()
        if self.in_flight:
            self.busy_s += now - self._mark
            self.slot_s += self.in_flight * (now - self._mark)
        self._mark = now
        self.in_flight += delta
        if delta > 0:
            self.requests += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def to_dict(self) -> dict:
        return {"requests": self.requests, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "busy_s": self.busy_s, "slot_s": self.slot_s, "served_s": self.served_s}


@dataclass
class EmulatorStats:
    requests: int = 0             # chat requests received (probes excluded)
    probes: int = 0               # moaa health probes received
    completed: int = 0            # answers sent in full
    disconnects: int = 0          # requests the client cancelled (closed the connection) before the end
    rejected: int = 0             # 429s for the concurrency cap
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # injected errors by status
    faults: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # stalls, cuts, malformed...
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: dict[str, deque] = field(default_factory=dict)  # model (base name) -> last request bodies
    tokens: int = 0
    authorization: str | None = None  # the last Authorization header seen
    models: dict[str, ModelStats] = field(default_factory=dict)  # per model (base name), probes excluded

    def to_dict(self) -> dict:
        return {"requests": self.requests, "probes": self.probes, "completed": self.completed,
                "disconnects": self.disconnects, "rejected": self.rejected, "errors": dict(self.errors),
                "faults": dict(self.faults), "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "tokens": self.tokens, "authorization": self.authorization,
                # per model, slot-seconds spent answering: a benchmark divides it by slots x wall time for
                # the share of capacity the backend really had busy
                "busy_s": {m: st.served_s for m, st in self.models.items()},
                "bodies": {m: list(d) for m, d in self.bodies.items()},
                "models": {m: st.to_dict() for m, st in self.models.items()}}


class _Capacity:
    """Per-model concurrency cap: a counter for 'reject', a semaphore for 'queue'."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self.sem = asyncio.Semaphore(limit)


Writer = Callable[[bytes], Awaitable[None]]


def chunk_heads(rid: str, model: str, created: int, n: int) -> list[bytes]:
    """The fixed start of each choice's content chunk, built once per request (the hot path only
    splices the token in)."""
    head = chunk(rid, model, created, [{"index": 0, "delta": {"content": ""}, "finish_reason": None}])
    prefix = head[: head.index(b'"delta":{"content":') + len(b'"delta":{"content":')]
    return [prefix.replace(b'"index":0,', b'"index":%d,' % i) for i in range(n)]


def content_chunk(heads: list[bytes], tokens: list[list[str]], step: int):
    """The step-th token of each choice that has one (a stop string may end choices at different lengths)."""
    for i, head in enumerate(heads):
        if step < len(tokens[i]):
            yield head + json.dumps(tokens[i][step], ensure_ascii=False).encode() + b'},"finish_reason":null}]}\n\n'


class ChatServing:
    def __init__(self, settings: EmulatorSettings):
        self.settings = settings
        self._capacity: dict[str, _Capacity] = {}
        self.reset()

    def reset(self) -> None:
        """Fresh counters and seeded draws, as at start."""
        self.stats = EmulatorStats()
        self._rng = random.Random(self.settings.seed)
        self._jitter_rng = random.Random(self.settings.seed + 1)  # apart from the error draws: same faults either way

    def record(self, model: str, body: dict, probe: bool, s: EmulatorSettings) -> None:
        if probe:
            self.stats.probes += 1
            return
        self.stats.requests += 1
        if s.record and s.history:
            q = self.stats.bodies.get(model)
            if q is None or q.maxlen != s.history:
                q = self.stats.bodies[model] = deque(q or (), maxlen=s.history)
            q.append(body)

    def first_token_delay(self, s: EmulatorSettings) -> float:
        return s.ttft_s + (self._jitter_rng.random() * s.ttft_jitter_s if s.ttft_jitter_s else 0.0)

    def draw_error(self, s: EmulatorSettings) -> int | None:
        if not s.error_rates:
            return None
        r = self._rng.random()
        acc = 0.0
        for status, p in sorted(s.error_rates.items()):
            acc += p
            if r < acc:
                self.stats.errors[status] += 1
                return status
        return None

    def capacity(self, model: str, s: EmulatorSettings) -> _Capacity | None:
        if s.max_concurrency is None:
            return None
        cap = self._capacity.get(model)
        if cap is None or cap.limit != s.max_concurrency:
            cap = self._capacity[model] = _Capacity(s.max_concurrency)
        return cap

    def begin(self, model: str | None) -> None:
        """A request starts; `model` None for health probes (kept out of the per-model load)."""
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        if model is not None:
            self.stats.models.setdefault(model, ModelStats()).change(+1)

    def end(self, model: str | None) -> None:
        self.stats.in_flight -= 1
        if model is not None and model in self.stats.models:  # a reset may have come in between
            self.stats.models[model].change(-1)

    def served(self, model: str | None, seconds: float) -> None:
        """A slot of `model` spent `seconds` answering (probes, `model` None, kept out like in begin/end)."""
        if model is not None and model in self.stats.models:
            self.stats.models[model].served_s += seconds

    async def stall(self, s: EmulatorSettings, kind: str) -> None:
        self.stats.faults[kind] += 1
        await asyncio.sleep(s.stall_s)

    # -- generation --------------------------------------------------------------------------
    @staticmethod
    def reasoning(body: dict, s: EmulatorSettings) -> int:
        """Reasoning deltas sent before the answer: like vLLM's, they count against max_tokens."""
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        return min(s.reasoning_tokens, max_tokens) if max_tokens else s.reasoning_tokens

    @staticmethod
    def plan(body: dict, s: EmulatorSettings, reasoning: int = 0) -> tuple[list[list[str]], str]:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        n = 1 if s.ignore_n else body.get("n") or 1
        if max_tokens:
            max_tokens -= reasoning
            if not max_tokens:  # the reasoning took the whole budget: no answer, cut at max_tokens
                return [[] for _ in range(n)], "length"
        count = max_tokens or s.default_max_tokens
        if s.judge or s.echo:
            tokens = (text_tokens(judge_reply(Policy(split_model(body["model"])[0]), body["messages"]), max_tokens)
                      if s.judge else echo_tokens(body, max_tokens))
            tokens, stopped = cut_at_stop(tokens, body.get("stop"))
            return [tokens] * n, "length" if max_tokens and len(tokens) == max_tokens and not stopped else "stop"
        cut = [cut_at_stop(generate_tokens(body, i, count), body.get("stop")) for i in range(n)]
        finish = "length" if max_tokens and not all(stopped for _, stopped in cut) else "stop"   # one finish for all
        return [tokens for tokens, _ in cut], finish

    @staticmethod
    def usage(body: dict, tokens: list[list[str]], reasoning: int = 0) -> dict:
        """Reasoning tokens are completion tokens, as vLLM and OpenAI count them (one set per choice)."""
        p = count_prompt_tokens(body)
        c = sum(len(t) for t in tokens) + reasoning * len(tokens)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def answer(self, body: dict, model: str, s: EmulatorSettings) -> dict:
        """A non-streamed answer after ttft + generation time (faults handled by the router)."""
        reasoning = self.reasoning(body, s)
        tokens, finish = self.plan(body, s, reasoning)
        delay = self.first_token_delay(s) + ((reasoning + len(tokens[0])) / s.tokens_per_s if s.tokens_per_s else 0.0)
        if delay:
            await asyncio.sleep(delay)
        self.stats.tokens += sum(len(t) for t in tokens) + reasoning * len(tokens)
        thought = "".join(generate_tokens(body, -1, reasoning)) if reasoning else ""
        return completion(f"chatcmpl-{uuid.uuid4().hex[:16]}", model, ["".join(t) for t in tokens], finish,
                          self.usage(body, tokens, reasoning), thought)

    async def stream(self, body: dict, model: str, s: EmulatorSettings, write: Writer,
                     cut: Callable[[], None]) -> bool:
        """SSE chunks like vLLM: a role chunk, one chunk per token (per choice), the finish chunk, a
        usage chunk when asked for, then [DONE]. Faults strike after the configured number of chunks.
        Returns whether the whole answer went out."""
        reasoning = self.reasoning(body, s)
        tokens, finish = self.plan(body, s, reasoning)
        finish = s.finish_reason or finish
        rid = None if s.omit_ids else f"chatcmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        n = len(tokens)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        heads = chunk_heads(rid, model, created, n)
        t0 = loop.time()
        ttft = self.first_token_delay(s)
        if ttft:
            await asyncio.sleep(ttft)
        await write(chunk(rid, model, created, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None} for i in range(n)]))
        for word in generate_tokens(body, -1, reasoning) if reasoning else ():
            await write(chunk(rid, model, created, [{"index": i, "delta": {"reasoning_content": word},
                                                     "finish_reason": None} for i in range(n)]))
            self.stats.tokens += n
        for step in range(max(len(t) for t in tokens)):
            if s.stall_after_chunks == step:
                await self.stall(s, "stall_after_chunks")
            if s.disconnect_after_chunks == step:
                self.stats.faults["disconnect"] += 1
                cut()
                return False
            if s.malformed_after_chunks == step:
                self.stats.faults["malformed"] += 1
                await write(b'data: {"id": "' + rid.encode() + b'", "choices": [{"delta": \n\n')
                cut()
                return False
            if s.end_after_chunks == step:
                self.stats.faults["end"] += 1
                return False
            if s.error_after_chunks == step:
                self.stats.faults["stream_error"] += 1
                await write(b"data: " + json.dumps(error_body("emulated error in stream", 500)).encode() + b"\n\n")
                await write(b"data: [DONE]\n\n")
                return False
            if s.tokens_per_s:
                wait = t0 + ttft + (step + 1) / s.tokens_per_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            await write(b"".join(content_chunk(heads, tokens, step)))
            self.stats.tokens += sum(step < len(t) for t in tokens)
        await write(chunk(rid, model, created, [{"index": i, "delta": {}, "finish_reason": finish}
                                                for i in range(n)]))
        if include_usage:
            await write(chunk(rid, model, created, [], self.usage(body, tokens, reasoning)))
        if not s.omit_done:
            await write(b"data: [DONE]\n\n")
        return True
