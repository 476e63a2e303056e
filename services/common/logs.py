"""Structured (JSON) logs carrying the request id of the call being served.

The request id lives in a context variable, so every log line written while a call is served carries
it. Prompt text, answers and tokens are never logged at INFO or above; servicers log sizes and codes.
"""
from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid

from moaa.loglevel import env_level

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("moaa_request_id", default="-")


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


MAX_REQUEST_ID = 128
# the header (HTTP) and metadata key (gRPC, where the request's own request_id field wins) a client names its
# call with; both doors send the call's id back under it (HTTP response header, gRPC trailing metadata)
REQUEST_ID_HEADER = "x-request-id"


def client_request_id(value: str) -> str:
    """A request id a client sent (gRPC field, HTTP header), or a new one when it is empty, longer than
    MAX_REQUEST_ID or holds a newline or other control character: ids go into every log line of the
    call (a newline would forge lines in the text format) and back to the client."""
    if not value or len(value) > MAX_REQUEST_ID or not value.isprintable():
        return new_request_id()
    return value


def call_request_id(own: str, context) -> str:
    """A gRPC call's id: the request's own `own`, else the caller's REQUEST_ID_HEADER metadata, else a new
    one (as client_request_id). Set in the call's trailing metadata, so that the client gets it back
    whatever the call ends with, a refusal before its request was read included."""
    if not own:
        own = next((v for k, v in context.invocation_metadata() or () if k == REQUEST_ID_HEADER), "")
    rid = client_request_id(own if isinstance(own, str) else "")
    context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
    return rid


def item_request_id(own: str, call_id: str, item_id: str) -> str:
    """A stream item's request id: its own, else the stream call's id and the item's, so the items'
    log lines are found under the call's (both client strings: checked as client_request_id)."""
    return client_request_id(own or (f"{call_id}-{item_id}" if item_id else ""))


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # set explicitly by the call's own log lines
            record.request_id = request_id_var.get()
        return True


_STD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, request id, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", request_id_var.get()),
            "msg": record.getMessage(),
        }
        for key, val in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = val
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def serving_level() -> int:
    """A server's level: $MOAA_LOG_LEVEL when set, else INFO (one line per call), or DEBUG with -vv."""
    level = env_level()
    return level if level is not None else min(logging.getLogger().level, logging.INFO)


def configure_logging(level: int | str = logging.INFO, json_lines: bool = True) -> None:
    """Root logging for a server process: JSON lines on stderr with the request id."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)
