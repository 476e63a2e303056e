"""Emulator settings and the OpenAI-shaped bodies it sends.

Settings apply per server, per model (profiles), and per request: a model name suffix
`name@key=value,key=value` or a JSON header `X-Emulator: {"key": value}` overrides any field, so one
emulator can host a stalling model next to a healthy one.
"""
from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moaa.errors import validation_message

OVERRIDE_HEADER = "X-Emulator"


class EmulatorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttft_s: float = Field(0.0, ge=0, description="delay before the first token (and before headers when not streamed)")
    ttft_jitter_s: float = Field(0.0, ge=0, description="extra first-token delay drawn uniformly from [0, ttft_jitter_s) "
                                                    "per request (seeded), as real answers vary")
    tokens_per_s: float = Field(0.0, ge=0, description="generation speed; 0 = as fast as possible")
    echo: bool = Field(False, description="answer with the request's message contents (word by word) instead of "
                                          "generated words, so a test can read what a model was sent")
    ignore_n: bool = Field(False, description="answer one choice whatever n says (as transformers serve does)")
    default_max_tokens: int = Field(16, ge=1, description="answer length when the request sets no max_tokens")
    max_concurrency: int | None = Field(None, ge=1, description="requests served at once per model")
    overflow: Literal["reject", "queue"] = Field("reject", description="beyond max_concurrency: 429 or wait")
    error_rates: dict[int, float] = Field(default_factory=dict,
                                          description="status -> probability per request, e.g. {429: 0.1, 500: 0.05}")
    retry_after_s: float | None = Field(None, ge=0, description="Retry-After header on 429 answers")
    seed: int = Field(0, description="seed of the error draws")
    stall_before_headers: bool = Field(False, description="accept the request, then never answer")
    stall_after_chunks: int | None = Field(None, ge=0, description="hang after sending this many content chunks")
    stall_s: float = Field(3600.0, ge=0, description="how long a stall lasts")
    disconnect_after_chunks: int | None = Field(None, ge=0, description="drop the connection after this many chunks")
    malformed_after_chunks: int | None = Field(None, ge=0, description="send a non-JSON chunk after this many chunks")
    error_after_chunks: int | None = Field(None, ge=0, description="send an in-stream error event after this many chunks")
    api_key: str | None = Field(None, description="require `Authorization: Bearer <api_key>` (401 otherwise)")
    health_status: int = Field(200, description="what /health answers (200 even while stalling, like vLLM)")
    record: bool = Field(True, description="keep request bodies for assertions")
    history: int = Field(64, ge=0, description="request bodies kept per model")
    judge: bool = Field(False, description="answer moaa's judging prompts by the policy the model name spells "
                                           "(e.g. keyword:paris+text; see services/emulator/judge.py)")


class OverrideError(ValueError):
    pass


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def split_model(model: str) -> tuple[str, dict[str, Any]]:
    """'name@ttft_s=0.5,stall_after_chunks=2' -> ('name', {...})."""
    base, sep, rest = model.partition("@")
    if not sep:
        return model, {}
    overrides = {}
    for part in filter(None, rest.split(",")):
        key, eq, val = part.partition("=")
        if not eq:
            raise OverrideError(f"model suffix part {part!r} is not key=value")
        overrides[key.strip()] = _value(val.strip())
    return base, overrides


def effective_settings(base: EmulatorSettings, *layers: dict[str, Any]) -> EmulatorSettings:
    merged = base.model_dump()
    for layer in layers:
        merged.update(layer)
    try:
        return EmulatorSettings.model_validate(merged)
    except ValidationError as err:
        raise OverrideError(validation_message(err)) from None


def header_overrides(value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        raise OverrideError(f"{OVERRIDE_HEADER} header is not JSON") from None
    if not isinstance(data, dict):
        raise OverrideError(f"{OVERRIDE_HEADER} header must be a JSON object")
    return data


def error_body(message: str, status: int, err_type: str | None = None) -> dict:
    """OpenAI's error shape (vLLM sends the same)."""
    types = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}
    return {"error": {"message": message, "type": err_type or types.get(status, "APIError"),
                      "param": None, "code": status}}


def chunk(rid: str, model: str, created: int, choices: list[dict], usage: dict | None = None) -> bytes:
    obj: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def completion(rid: str, model: str, texts: list[str], finish: str, usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish,
                         "logprobs": None} for i, t in enumerate(texts)],
            "usage": usage}


def validate_chat(body: Any) -> str | None:
    """A 400 message for a request vLLM would refuse, or None."""
    if not isinstance(body, dict):
        return "request body must be a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model is required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages must be a non-empty list"
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
            return "each message needs a role and string content"
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    if mt is not None and (not isinstance(mt, int) or mt < 1):
        return "max_tokens must be a positive integer"
    n = body.get("n", 1)
    if not isinstance(n, int) or n < 1 or n > 128:
        return "n must be an integer between 1 and 128"
    return None
