"""The one per-model token record ({model: {prompt_tokens, completion_tokens, requests}}) and how a call's
tokens are added to it: used by the rows' journaled `usage`, the dataset store's sums and the token ledger.
No dependencies, so the store, the ledger and the client package can all share it."""
from __future__ import annotations

from typing import Any


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from a proto Usage, the client's Usage, or a dict."""
    if usage is None:
        return 0, 0
    if isinstance(usage, dict):
        return int(usage.get("prompt_tokens", 0) or 0), int(usage.get("completion_tokens", 0) or 0)
    return int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0)


def add_usage(into: dict[str, dict[str, int]], model: str, prompt_tokens: int, completion_tokens: int,
              requests: int = 1) -> None:
    """Add one call's tokens to a per-model record."""
    rec = into.setdefault(model or "unknown", {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})
    rec["prompt_tokens"] += int(prompt_tokens)
    rec["completion_tokens"] += int(completion_tokens)
    rec["requests"] += int(requests)
