"""Judge mode of the emulator (`judge: true`): answers moaa's judging prompts by a fixed policy.

It reads the answers out of the judging prompt (the `[Answer N]` / `[Answer A]` blocks and the
`Answer: ...` line of the single-answer template) and replies in the format asked. The policy is the
served model name, `POLICY[+MODIFIER...]`:
  first        always prefers the answer shown first (pairwise [[A]]; pointwise: falling with position)
  longest      prefers longer answers;   keyword:WORD  prefers answers containing WORD
  garbage      never gives a readable answer
modifiers: `flaky` (unreadable first reply, readable after the retry nudge), `text` (pointwise as
`Answer N: S/10` lines instead of JSON), `delay=SECONDS` (added to the first-token delay), and
`name=ANY` (ignored: makes served names distinct so per-model stats are apart), `overall=POLICY` (pointwise
JSON: the criteria ratings follow the policy, the overall `score` follows POLICY, as a judge whose overall
rating disagrees with its own criteria), `skip=WORD` (pointwise: leaves the answers containing WORD unrated,
as a judge that rates only some of them; read again after the retry nudge, it still does).
Per-model request counts and busy time are in the emulator's stats (`models`).
"""
from __future__ import annotations

import json
import re

from .protocol import EmulatorSettings

RETRY_MARK = "could not be read"


class Policy:
    def __init__(self, model: str):
        parts = model.split("+")
        self.name, _, self.arg = parts[0].partition(":")
        self.flaky = "flaky" in parts
        self.text = "text" in parts
        self.delay = next((float(p.split("=", 1)[1]) for p in parts if p.startswith("delay=")), 0.0)
        self.overall = next((Policy(p.split("=", 1)[1]) for p in parts if p.startswith("overall=")), self)
        self.skip = next((p.split("=", 1)[1].lower() for p in parts if p.startswith("skip=")), None)

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
        scores = _pointwise_scores(policy, numbered, lo, hi)
        if policy.text:
            return "\n".join(f"Answer {k}: {s:g}/{hi:g} - judged by {policy.name}" for k, s in sorted(scores.items()))
        overall = scores if policy.overall is policy else _pointwise_scores(policy.overall, numbered, lo, hi)
        return json.dumps({"criteria": ["accuracy", "clarity"], "ratings": [
            {"answer": k, "criteria": {"accuracy": s, "clarity": s}, "score": overall[k],
             "reason": f"{policy.name} policy"} for k, s in sorted(scores.items())]})
    m = re.search(r"Answer: (.*)\nScore:\s*$", user, re.S)
    if m:
        q = policy.quality(m.group(1), 0)
        return f"Score: {hi - 1:g}" if q > 0 else f"Score: {lo + 1:g}"
    return "I do not know what to judge."


def _pointwise_scores(policy: Policy, numbered: dict[int, str], lo: float, hi: float) -> dict[int, float]:
    """Answer number -> score on the scale, by the policy's quality (equal quality: hi - 1 for all)."""
    qual = {k: policy.quality(v, k - 1) for k, v in numbered.items()}
    top, bottom = max(qual.values()), min(qual.values())
    return {k: hi - 1 if top == bottom else round(lo + 1 + (q - bottom) / (top - bottom) * (hi - lo - 2), 1)
            for k, q in qual.items() if not (policy.skip and policy.skip in numbered[k].lower())}


def judge_timing(s: EmulatorSettings, model: str) -> EmulatorSettings:
    """The policy's `delay=` modifier, added to the first-token delay."""
    delay = Policy(model).delay
    return s.model_copy(update={"ttft_s": s.ttft_s + delay}) if delay else s
