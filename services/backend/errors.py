"""The one error type every backend failure becomes, and what an error answer says (message, wait)."""
from __future__ import annotations

import email.utils
import json
import re
import time

from moaa.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, MoaaError, UserError

CAUSES = (
    "connect", "timeout", "rate_limited", "http_4xx", "http_5xx",
    "stream_cut", "malformed", "cancelled", "circuit_open", "queue_full",
    "max_tokens",  # an answer cut at max_tokens before any content (a reasoning model's budget spent on thinking)
)
# Causes worth another attempt (on another replica where there is one). 4xx is the caller's fault.
RETRYABLE = frozenset({"connect", "timeout", "rate_limited", "http_5xx", "stream_cut", "malformed", "circuit_open"})
# Causes that count against a replica's circuit breaker and health.
REPLICA_FAULTS = frozenset({"connect", "timeout", "http_5xx", "stream_cut", "malformed"})
# Statuses of a request the model will never take as it stands (vLLM: 400 for a prompt past its context).
REFUSED_STATUSES = frozenset({400, 413, 422})


class BackendError(MoaaError):
    """A failed call to one backend (model), naming the replica endpoint and the cause."""

    def __init__(self, model: str, endpoint: str, cause: str, message: str,
                 http_status: int = 0, attempts: int = 1):
        if cause not in CAUSES:
            raise ValueError(f"unknown BackendError cause {cause!r}")
        self.model = model
        self.endpoint = endpoint
        self.cause = cause
        self.http_status = http_status
        self.message = message
        self.attempts = attempts
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        status = f" HTTP {self.http_status}" if self.http_status else ""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"backend {self.model!r}{where}: {self.cause}{status}: {self.message}{tries}"

    def __reduce__(self):  # keep pickling (multiprocessing, pytest-xdist) working with our __init__
        return (BackendError, (self.model, self.endpoint, self.cause, self.message, self.http_status, self.attempts))

    @property
    def retryable(self) -> bool:
        return self.cause in RETRYABLE or self.http_status == 408

    @property
    def refused(self) -> bool:
        """The model refused this request as it stands: no retry or other replica makes it answer."""
        return refused(self.cause, self.http_status)

    @property
    def too_long(self) -> bool:
        """Refused for the prompt's length (with the reply's tokens) past the model's context: the caller's to
        shorten. Other refusals (a parameter the server does not take) may be our config's doing."""
        return too_long(self.cause, self.http_status, self.message)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_BAD_INPUT if self.cause == "http_4xx" and self.http_status not in (408, 409) else EXIT_TRANSIENT

    def to_dict(self) -> dict:
        return {"model": self.model, "endpoint": self.endpoint, "cause": self.cause,
                "http_status": self.http_status, "message": self.message, "attempts": self.attempts}


def refused(cause: str, http_status: int) -> bool:
    """`refused` of a BackendError or of its proto (common_pb2.BackendError) by cause and status."""
    return cause == "http_4xx" and http_status in REFUSED_STATUSES


# How servers word a prompt past the context: vLLM and OpenAI "maximum context length", SGLang "longer than
# the model's context length", llama.cpp "exceeds the available context size", TGI (422) "max_new_tokens".
_TOO_LONG = re.compile(r"context[ _-]?(length|size|window)|max_new_tokens|(prompt|input)\b.{0,60}(too long|longer than)",
                       re.IGNORECASE)


def too_long(cause: str, http_status: int, message: str) -> bool:
    """`too_long` of a BackendError or of its proto by cause, status and message."""
    return refused(cause, http_status) and _TOO_LONG.search(message) is not None


class UnknownBackendError(UserError, LookupError):
    """A model name that is not in the config's backends."""


def error_message(body: bytes | str, limit: int = 500) -> str:
    """The readable message of an OpenAI-style error body (also vLLM's and FastAPI's shapes)."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:limit] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(err.get(key), str) and err[key]:
                    return err[key][:limit]
            if isinstance(err.get("detail"), list):
                return json.dumps(err["detail"])[:limit]
        elif isinstance(err, str):
            return err[:limit]
    return text[:limit]


def retry_after(headers) -> float:
    """Seconds an error answer asks us to wait: OpenAI's `retry-after-ms`, `Retry-After` in seconds or as an
    HTTP date, else the reset of an exhausted `x-ratelimit-*` budget (OpenAI: `x-ratelimit-reset-requests: 1m2.5s`)."""
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    waits = [_duration(headers.get(f"x-ratelimit-reset-{kind}")) for kind in ("requests", "tokens")
             if headers.get(f"x-ratelimit-remaining-{kind}") == "0"]
    return max(waits, default=0.0)


def _duration(value: str | None) -> float:
    """'1m2.5s', '20ms', '6h0m0s' -> seconds (0 when unreadable)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value or "")
    if not parts or "".join(n + u for n, u in parts) != (value or "").strip():
        return 0.0
    return sum(float(n) * {"ms": 0.001, "h": 3600.0, "m": 60.0, "s": 1.0}[u] for n, u in parts)
