"""Emulator settings and the OpenAI-shaped bodies it sends.

Settings apply per server, per model (profiles), and per request: a model name suffix
`name@key=value,key=value` or a JSON header `X-Emulator: {"key": value}` overrides any field, so one
emulator can host a stalling model next to a healthy one.
"""
from __future__ import annotations

import email.utils
import json
import math
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
    retry_after_s: float | None = Field(None, ge=0, description="Retry-After header on 429 and 503 answers")
    retry_after_style: Literal["seconds", "ms", "http-date", "ratelimit-reset"] = Field(
        "seconds", description="how retry_after_s is sent: Retry-After in seconds, OpenAI's retry-after-ms, "
                               "Retry-After as an HTTP date, or only OpenAI's x-ratelimit-reset-requests (e.g. 1m2.5s)")
    seed: int = Field(0, description="seed of the error draws")
    stall_before_headers: bool = Field(False, description="accept the request, then never answer")
    stall_after_chunks: int | None = Field(None, ge=0, description="hang after sending this many content chunks")
    stall_s: float = Field(3600.0, ge=0, description="how long a stall lasts")
    disconnect_after_chunks: int | None = Field(None, ge=0, description="drop the connection after this many chunks")
    malformed_after_chunks: int | None = Field(None, ge=0, description="send a non-JSON chunk after this many chunks")
    error_after_chunks: int | None = Field(None, ge=0, description="send an in-stream error event after this many chunks")
    end_after_chunks: int | None = Field(None, ge=0, description="end the stream cleanly after this many chunks, with "
                                         "no finish_reason and no [DONE] (a proxy that cut it)")
    max_model_len: int | None = Field(None, ge=1, description="refuse, like vLLM, with a 400 naming the limit, a "
                                      "prompt whose tokens (words + 1 per message) with max_tokens exceed this")
    reject_max_tokens: bool = Field(False, description="refuse `max_tokens` with OpenAI's 400 for reasoning models "
                                    "(they take only `max_completion_tokens`)")
    ignore_stream: bool = Field(False, description="answer one JSON completion whatever `stream` says")
    reasoning_tokens: int = Field(0, ge=0, description="reasoning deltas (`reasoning_content`, as vLLM's reasoning "
                                  "parsers send) before the answer's content; they count against max_tokens, so as many as max_tokens leave "
                                  "no content and finish_reason length")
    finish_reason: str | None = Field(None, description="finish_reason to send instead of stop/length (TGI: eos_token)")
    omit_ids: bool = Field(False, description="chunks without id, object and created (as some servers send)")
    omit_done: bool = Field(False, description="end the stream without `data: [DONE]` (as TGI and SGLang may)")
    split_writes: bool = Field(False, description="send each event in two writes, cut inside a multi-byte UTF-8 "
                                                  "character where there is one; text is sent as raw UTF-8")
    gzip: bool = Field(False, description="answer with Content-Encoding: gzip")
    html_200: bool = Field(False, description="answer 200 with an HTML page instead of the answer (a proxy's page)")
    error_200: bool = Field(False, description="answer 200 with an OpenAI error object (code 502) as JSON instead of "
                                               "the answer, as some proxies and servers do")
    keepalive_timeout_s: float = Field(75.0, gt=0, description="server: idle keep-alive connections are closed after "
                                       "this (vLLM's uvicorn: 5 s); read when the emulator starts")
    keepalive_race: bool = Field(False, description="server: a request on a connection idle for keepalive_timeout_s "
                                 "is dropped unanswered, as when the server's keep-alive timer fires while the "
                                 "request is on its way; read when the emulator starts")
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


def chunk(rid: str | None, model: str, created: int, choices: list[dict], usage: dict | None = None) -> bytes:
    """One SSE event; rid None leaves out id, object and created. Text goes out as raw UTF-8, like vLLM."""
    obj: dict[str, Any] = ({} if rid is None else {"id": rid, "object": "chat.completion.chunk", "created": created}
                           ) | {"model": model, "choices": choices}
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def completion(rid: str, model: str, texts: list[str], finish: str, usage: dict, reasoning: str = "") -> dict:
    message = {"role": "assistant"} | ({"reasoning_content": reasoning} if reasoning else {})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": message | {"content": t}, "finish_reason": finish,
                         "logprobs": None} for i, t in enumerate(texts)],
            "usage": usage}


def retry_headers(s: EmulatorSettings) -> dict[str, str] | None:
    """The wait of a 429/503 answer as `retry_after_style` says hosted APIs and proxies send it."""
    wait = s.retry_after_s
    if wait is None:
        return None
    if s.retry_after_style == "ms":
        return {"retry-after-ms": f"{wait * 1000:g}"}
    if s.retry_after_style == "http-date":  # whole seconds only: round up so the wait is never shorter
        return {"Retry-After": email.utils.formatdate(time.time() + math.ceil(wait), usegmt=True)}
    if s.retry_after_style == "ratelimit-reset":
        minutes, seconds = divmod(wait, 60)
        return {"x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": (f"{minutes:g}m" if minutes else "") + f"{seconds:g}s"}
    return {"Retry-After": f"{wait:g}"}


def context_refusal(body: dict, prompt_tokens: int, max_model_len: int | None) -> str | None:
    """vLLM's 400 message for a prompt (with the reply's max_tokens) past the model's context, or None."""
    if max_model_len is None:
        return None
    reply = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    if prompt_tokens >= max_model_len:
        return (f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
                f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
                f"Please reduce the length of the input prompt.")
    if prompt_tokens + reply > max_model_len:
        return (f"'max_tokens' or 'max_completion_tokens' is too large: {reply}. This model's maximum context "
                f"length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
                f"({reply} > {max_model_len} - {prompt_tokens}).")
    return None


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
