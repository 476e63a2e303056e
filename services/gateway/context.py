"""Fitting references into a model's context window.

Tokens are counted with the model's tokenizer when the backend config names one (transformers'
AutoTokenizer, loaded lazily once per tokenizer and only when transformers is installed), otherwise with
a deliberately safe estimate (3 characters per token, which over-counts English text). When the
references do not fit, the longest ones are shortened first (water-filling) and end with a visible
marker; the result says how many tokens each lost, so nothing is swallowed silently.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 3.0          # safe: real tokenizers average ~4 chars/token on English
PER_MESSAGE_OVERHEAD = 8       # role markers and separators of a chat template
DEFAULT_REPLY_RESERVE = 512    # tokens kept free for the answer when max_tokens is unset
SAFETY_MARGIN = 32
TRIM_MARKER = "\n[... {n} tokens trimmed to fit the context window]"


class TokenCounter:
    """Counts and truncates text by tokens of one tokenizer, or by the safe estimate."""

    def __init__(self, tokenizer_name: str | None = None):
        self.name = tokenizer_name
        self._tok = _load_tokenizer(tokenizer_name) if tokenizer_name else None

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._tok is not None:
            return len(self._tok.encode(text, add_special_tokens=False))
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest prefix of `text` of at most `max_tokens` tokens."""
        if max_tokens <= 0:
            return ""
        if self._tok is not None:
            ids = self._tok.encode(text, add_special_tokens=False)
            return text if len(ids) <= max_tokens else self._tok.decode(ids[:max_tokens])
        return text[: int(max_tokens * CHARS_PER_TOKEN)]


@functools.lru_cache(maxsize=32)
def _load_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("tokenizer %s configured but transformers is not installed: using the safe estimate", name)
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - a broken tokenizer must not break serving
        log.warning("cannot load tokenizer %s (%s): using the safe estimate", name, err)
        return None


@functools.lru_cache(maxsize=32)
def counter_for(tokenizer_name: str | None) -> TokenCounter:
    return TokenCounter(tokenizer_name)


@dataclass
class FitResult:
    references: list[str]                  # possibly trimmed, same order
    trimmed_tokens: list[int]              # tokens removed per reference (0 = whole)
    tokens: int                            # tokens of the references after fitting
    budget: int                            # tokens available for references
    exact: bool                            # counted with the real tokenizer
    notes: list[str] = field(default_factory=list)

    @property
    def trimmed(self) -> bool:
        return any(self.trimmed_tokens)


def fit_references(references: list[str], *, fixed_messages: list[dict], context_window: int,
                   reply_tokens: int | None, counter: TokenCounter,
                   reference_max_tokens: int | None = None, fixed_extra: str = "") -> FitResult:
    """Shorten `references` so that messages + references + the reply fit `context_window`.

    `fixed_messages` are the agent's messages without references; `fixed_extra` is the instruction text.
    """
    fixed = sum(counter.count(m["content"]) + PER_MESSAGE_OVERHEAD for m in fixed_messages)
    fixed += counter.count(fixed_extra) + 4 * len(references)  # numbering
    reserve = reply_tokens if reply_tokens else min(DEFAULT_REPLY_RESERVE, context_window // 4)
    budget = max(0, context_window - fixed - reserve - SAFETY_MARGIN)
    counts = [counter.count(r) for r in references]
    caps = [min(c, reference_max_tokens) if reference_max_tokens else c for c in counts]
    notes: list[str] = []
    if sum(caps) > budget:
        caps = _water_fill(caps, budget)
        notes.append(f"references cut to {budget} tokens to fit a {context_window}-token context window")
    out, trimmed = [], []
    marker_cost = counter.count(TRIM_MARKER.format(n=99999))
    for ref, n, cap in zip(references, counts, caps):
        if cap >= n:
            out.append(ref)
            trimmed.append(0)
            continue
        keep = max(0, cap - marker_cost)
        out.append(counter.truncate(ref, keep) + TRIM_MARKER.format(n=n - keep))
        trimmed.append(n - keep)
    return FitResult(out, trimmed, sum(counter.count(r) for r in out), budget, counter.exact, notes)


def _water_fill(sizes: list[int], budget: int) -> list[int]:
    """Caps that sum to at most `budget`, shrinking the largest first (short answers stay whole)."""
    caps = list(sizes)
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    left = budget
    for pos, i in enumerate(order):
        share = left // (len(order) - pos)
        caps[i] = min(sizes[i], share)
        left -= caps[i]
    return caps
