"""Results of backend calls, and the OpenAI chat request body built from our config types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moaa.services.backend.config import SamplingConfig


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "Usage":
        d = d or {}
        p, c = int(d.get("prompt_tokens") or 0), int(d.get("completion_tokens") or 0)
        return cls(p, c, int(d.get("total_tokens") or p + c))

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens,
                     self.total_tokens + other.total_tokens)


@dataclass
class ChatChoice:
    index: int
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None  # this choice's own tokens, where the backend reported them apart from others


@dataclass
class ChatResult:
    model: str                 # backend name from the config
    endpoint: str              # replica that answered (several, comma-separated, when n was emulated)
    choices: list[ChatChoice]
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    ttft_s: float | None = None
    note: str = ""             # e.g. "n emulated with 2 requests"
    attempts: int = 1
    failures: list = field(default_factory=list)  # BackendErrors of the missing choices (partial_ok calls)

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]


@dataclass
class ChatChunk:
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None  # set on the last chunk when the backend reported usage
    index: int = 0


# Yielded by the client's retry loop when a retry starts over after events were passed on.
RESTART = object()


def sampling_dict(sampling: SamplingConfig | dict | None) -> dict[str, Any]:
    """Sampling fields to send: unset (None) and empty ones are left to the backend's defaults."""
    if sampling is None:
        return {}
    if isinstance(sampling, SamplingConfig):
        data = sampling.model_dump()
    elif isinstance(sampling, dict):
        data = SamplingConfig.model_validate(sampling).model_dump()  # same validation as the config
    else:
        raise TypeError(f"sampling must be SamplingConfig or dict, not {type(sampling).__name__}")
    return {k: v for k, v in data.items() if v is not None and v != []}


def chat_body(model: str, messages: list[dict], sampling: dict[str, Any], n: int = 1,
              max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    """A streamed OpenAI chat request; usage is asked for in the stream's last chunk. max_tokens goes out
    under `max_tokens_field` (the backend's config: hosted reasoning models take only max_completion_tokens)."""
    if max_tokens_field != "max_tokens" and "max_tokens" in sampling:
        sampling = {(max_tokens_field if k == "max_tokens" else k): v for k, v in sampling.items()}
    body: dict[str, Any] = {"model": model, "messages": messages, **sampling,
                            "stream": True, "stream_options": {"include_usage": True}}
    if n != 1:
        body["n"] = n
    return body
