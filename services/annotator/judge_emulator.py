"""An OpenAI-compatible server that answers moaa's judging prompts by a fixed policy (tests, benchmarks).

It reads the answers out of the judging prompt (the `[Answer N]` / `[Answer A]` blocks and the
`Answer: ...` line of the single-answer template) and replies in the format asked. The policy is the
served model name, `POLICY[+MODIFIER...]`:
  first        always prefers the answer shown first (pairwise [[A]]; pointwise: falling with position)
  longest      prefers longer answers;   keyword:WORD  prefers answers containing WORD
  garbage      never gives a readable answer
modifiers: `flaky` (unreadable first reply, readable after the retry nudge), `text` (pointwise as
`Answer N: S/10` lines instead of JSON), `delay=SECONDS` (per request).
GET /stats reports requests and busy time per model, to measure how busy the judge backends were.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid

from aiohttp import web

RETRY_MARK = "could not be read"


class Policy:
    def __init__(self, model: str):
        parts = model.split("+")
        self.name, _, self.arg = parts[0].partition(":")
        self.flaky = "flaky" in parts
        self.text = "text" in parts
        self.delay = next((float(p.split("=", 1)[1]) for p in parts if p.startswith("delay=")), 0.0)

    def quality(self, text: str, position: int) -> float:
        if self.name == "first":
            return -position
        if self.name == "longest":
            return len(text)
        if self.name == "keyword":
            return 1.0 if self.arg.lower() in text.lower() else 0.0
        return 0.0


def _blocks(prompt: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip() for m in
            re.finditer(r"\[Answer (\w+)\]\n(.*?)\n\[End of answer \1\]", prompt, re.S)}


def _scale(prompt: str) -> tuple[float, float]:
    m = re.search(r"from (\d+(?:\.\d+)?) \(\w+[^)]*\) to (\d+(?:\.\d+)?)", prompt)
    return (float(m.group(1)), float(m.group(2))) if m else (1.0, 10.0)


def judge_reply(policy: Policy, messages: list[dict]) -> str:
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    retry = RETRY_MARK in messages[-1].get("content", "")
    if policy.name == "garbage" or (policy.flaky and not retry):
        return "All of these answers have their merits and I cannot decide."
    lo, hi = _scale(user)
    blocks = _blocks(user)
    if "A" in blocks and "B" in blocks:
        qa, qb = policy.quality(blocks["A"], 0), policy.quality(blocks["B"], 1)
        verdict = "A" if qa > qb else "B" if qb > qa else "tie"
        return f"Comparing both answers carefully.\n[[{verdict}]]"
    numbered = {int(k): v for k, v in blocks.items() if k.isdigit()}
    if numbered:
        qual = {k: policy.quality(v, k - 1) for k, v in numbered.items()}
        top, bottom = max(qual.values()), min(qual.values())
        scores = {k: hi - 1 if top == bottom else round(lo + 1 + (q - bottom) / (top - bottom) * (hi - lo - 2), 1)
                  for k, q in qual.items()}
        if policy.text:
            return "\n".join(f"Answer {k}: {s:g}/{hi:g} - judged by {policy.name}" for k, s in sorted(scores.items()))
        return json.dumps({"criteria": ["accuracy", "clarity"], "ratings": [
            {"answer": k, "criteria": {"accuracy": s, "clarity": s}, "score": s, "reason": f"{policy.name} policy"}
            for k, s in sorted(scores.items())]})
    m = re.search(r"Answer: (.*)\nScore:\s*$", user, re.S)
    if m:
        q = policy.quality(m.group(1), 0)
        return f"Score: {hi - 1:g}" if q > 0 else f"Score: {lo + 1:g}"
    return "I do not know what to judge."


class JudgeEmulator:
    """Start with `await emu.start()`; `emu.url` is the base URL (…/v1)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.stats: dict[str, dict] = {}
        self._runner: web.AppRunner | None = None
        self._t0 = time.monotonic()

    def _model_stats(self, model: str) -> dict:
        return self.stats.setdefault(model, {"requests": 0, "in_flight": 0, "max_in_flight": 0, "busy_s": 0.0,
                                             "slot_s": 0.0, "_since": 0.0})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model", "")
        st = self._model_stats(model)
        now = time.monotonic()
        if st["in_flight"] == 0:
            st["_since"] = now
        st["_slot_mark"] = st.get("_slot_mark", now)
        st["slot_s"] += st["in_flight"] * (now - st["_slot_mark"])
        st["_slot_mark"] = now
        st["in_flight"] += 1
        st["requests"] += 1
        st["max_in_flight"] = max(st["max_in_flight"], st["in_flight"])
        try:
            policy = Policy(model)
            if policy.delay:
                await asyncio.sleep(policy.delay)
            text = judge_reply(policy, body.get("messages", []))
        finally:
            now = time.monotonic()
            st["slot_s"] += st["in_flight"] * (now - st["_slot_mark"])
            st["_slot_mark"] = now
            st["in_flight"] -= 1
            if st["in_flight"] == 0:
                st["busy_s"] += now - st["_since"]
        words = len(text.split())
        return web.json_response({
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": words, "total_tokens": 10 + words}})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict:
        return {m: {k: v for k, v in s.items() if not k.startswith("_")} for m, s in self.stats.items()}

    def reset_stats(self) -> None:
        self.stats.clear()

    async def start(self) -> "JudgeEmulator":
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", lambda r: web.json_response({"status": "ok"}))
        app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": []}))
        app.router.add_get("/stats", self.get_stats)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
