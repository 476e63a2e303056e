"""Judge prompts and rating parsing for `moaa eval`: pairwise (both orders) and MT-Bench-style 1-10 grading.

Pure functions: building the messages a judge receives and reading its rating (a verdict is read by the
annotator's one parser, `parse_verdict`). A strict
format is asked for ("[[A]]", "[[B]]", "[[C]]" for a tie; "Rating: [[7]]"), and common deviations are
still read; an answer that cannot be read returns None and is retried or counted as an abstention by
the caller, never turned into a score.
"""
from __future__ import annotations

import re
from statistics import mean

PAIRWISE_SYSTEM = (
    "You compare two answers written by AI assistants to the same user request. Judge which answer "
    "serves the user better: correct, helpful, relevant, complete, clearly written. Do not let the order "
    "of the answers, their length or the assistants' names sway you. Explain your reasoning in two or three "
    "sentences, then give your verdict on the last line exactly as [[A]] if answer A is better, [[B]] if "
    "answer B is better, or [[C]] for a tie."
)

GRADING_SYSTEM = (
    "You grade one answer written by an AI assistant to a user request. Consider correctness, helpfulness, "
    "relevance, depth and clarity; be strict and objective. Explain your grade in two or three sentences, "
    "then give the grade on the last line exactly in the form: Rating: [[N]] with N a whole number from 1 "
    "(useless) to 10 (excellent)."
)


def _conversation_text(messages: list[dict]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def pairwise_messages(prompt: list[dict], answer_a: str, answer_b: str) -> list[dict]:
    user = (f"[User request]\n{_conversation_text(prompt)}\n\n[Answer A]\n{answer_a}\n[End of answer A]\n\n"
            f"[Answer B]\n{answer_b}\n[End of answer B]")
    return [{"role": "system", "content": PAIRWISE_SYSTEM}, {"role": "user", "content": user}]


def grading_messages(prompt: list[dict], answer: str) -> list[dict]:
    user = f"[User request]\n{_conversation_text(prompt)}\n\n[Answer]\n{answer}\n[End of answer]"
    return [{"role": "system", "content": GRADING_SYSTEM}, {"role": "user", "content": user}]


_RATING_PATTERNS = [
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),
    re.compile(r"rating\s*[:=]?\s*\[?\s*(\d+(?:\.\d+)?)\s*\]?", re.I),
    re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"),
    re.compile(r"\b(?:score|grade)\s*(?:is|of|:)?\s*(\d+(?:\.\d+)?)\b", re.I),
]


def parse_rating(text: str, lo: float = 1.0, hi: float = 10.0) -> float | None:
    """An MT-Bench-style grade in [lo, hi], or None (unreadable or out of range: never clipped)."""
    if not text:
        return None
    for pattern in _RATING_PATTERNS:
        found = pattern.findall(text)
        if found:
            value = float(found[-1])
            return value if lo <= value <= hi else None
    return None


def grading_summary(scores: dict[str, list[float | None]], failed: dict[str, int] | None = None) -> dict[str, dict]:
    """Per model: mean of readable grades, count, abstentions, and failed gradings (a judge error: no grade
    yet, retried by a re-run, never an abstention)."""
    out = {}
    for model, vals in scores.items():
        ok = [v for v in vals if v is not None]
        out[model] = {"mean": mean(ok) if ok else None, "n": len(ok), "abstained": len(vals) - len(ok),
                      "failed": (failed or {}).get(model, 0)}
    return out
