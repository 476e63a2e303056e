"""Server-sent events as OpenAI-compatible servers send them (aiohttp has no client-side SSE parser),
and the shape check of the chat chunks they carry.

The parser is fed one line at a time so that the caller can put its own timeout on each read.
"""
from __future__ import annotations

import json

import orjson

DONE = object()  # the `data: [DONE]` sentinel


class MalformedEvent(ValueError):
    """A `data:` payload that is not the JSON object the protocol promises."""


class SSEParser:
    """Collects `data:` lines into events; an empty line ends an event.

    Works on bytes and parses each event's JSON with orjson: per chunk of a stream this is most of the
    gateway's own CPU, so nothing is decoded or copied that the event does not need."""

    MAX_LINE = 16 << 20  # a "line" this long without a newline is not SSE

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._partial = b""

    def feed(self, data: bytes) -> list[object]:
        """Feeds raw bytes as they arrive (any split); returns the events they complete."""
        lines = (self._partial + data if self._partial else data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            raise MalformedEvent(f"stream line longer than {self.MAX_LINE} bytes")
        events: list[object] = []
        for line in lines:
            self._line(line, events)
        return events

    def _line(self, line: bytes, events: list[object]) -> None:
        if line.endswith((b"\r", b"\n")):
            line = line.rstrip(b"\r\n")
        if not line:
            if self._data:
                events.append(self._flush())
        elif line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            self._data.append(b"")
        # comments (":") and event:, id:, retry: carry nothing we use

    def close(self) -> list[object]:
        """End of stream: a pending line and event without their newlines still count."""
        events: list[object] = []
        if self._partial:
            self._line(self._partial, events)
        self._partial = b""
        if self._data:
            events.append(self._flush())
        return events

    def _flush(self) -> object:
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            if data.strip() == b"[DONE]":
                return DONE
            # what orjson refuses but the stdlib reads (NaN, huge integers, invalid UTF-8 replaced)
            try:
                obj = json.loads(data.decode("utf-8", "replace"))
            except ValueError:
                # No excerpt: the payload is model output, which stays out of errors and logs.
                raise MalformedEvent(f"stream chunk of {len(data)} bytes is not JSON") from None
        if type(obj) is not dict:
            raise MalformedEvent(f"stream chunk is JSON but not an object ({type(obj).__name__})")
        return obj


_MAX_COUNT = 1 << 62  # token counts go into uint64 proto fields


def _optional(obj: dict, key: str, kind: type, where: str):
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise MalformedEvent(f"{where}.{key} is {type(value).__name__}, not {kind.__name__}")
    return value


def check_chat_chunk(ev: dict) -> dict:
    """`ev` (a parsed chunk) if it has the shape of an OpenAI chat completion chunk, else MalformedEvent.

    Valid JSON of the wrong shape (a string delta, a list as usage, a text index, a negative token
    count) would otherwise fail deep in the caller as a TypeError; here it is a typed `malformed`
    failure, retried like any other. Missing fields are allowed: servers omit what is empty."""
    if _plain_chunk(ev):
        return ev
    choices = ev.get("choices")
    if choices is None:
        choices = []
    if not isinstance(choices, list):
        raise MalformedEvent(f"stream chunk's choices is {type(choices).__name__}, not a list")
    for i, ch in enumerate(choices):
        where = f"choices[{i}]"
        if not isinstance(ch, dict):
            raise MalformedEvent(f"stream chunk's {where} is {type(ch).__name__}, not an object")
        index = ch.get("index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise MalformedEvent(f"stream chunk's {where}.index is {index!r}, not a non-negative integer")
        delta = _optional(ch, "delta", dict, where)
        if delta is not None:
            _optional(delta, "content", str, where + ".delta")
        _optional(ch, "text", str, where)
        _optional(ch, "finish_reason", str, where)
    usage = _optional(ev, "usage", dict, "stream chunk")
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = (usage or {}).get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 <= value < _MAX_COUNT):
            raise MalformedEvent(f"stream chunk's usage.{key} is {value!r}, not a token count")
    return ev


def _plain_chunk(ev: dict) -> bool:
    """The common shapes, checked with exact types (JSON gives no subclasses); anything else takes the
    full check, which names what is wrong. Cheap because it runs on every chunk of every stream."""
    choices = ev.get("choices")
    if choices is not None:
        if type(choices) is not list:
            return False
        for ch in choices:
            if type(ch) is not dict:
                return False
            index = ch.get("index", 0)
            if type(index) is not int or index < 0:
                return False
            delta = ch.get("delta")
            if delta is not None:
                if type(delta) is not dict:
                    return False
                content = delta.get("content")
                if content is not None and type(content) is not str:
                    return False
            text, fin = ch.get("text"), ch.get("finish_reason")
            if (text is not None and type(text) is not str) or (fin is not None and type(fin) is not str):
                return False
    usage = ev.get("usage")
    if usage is not None:
        if type(usage) is not dict:
            return False
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(key)
            if value is not None and (type(value) is not int or not 0 <= value < _MAX_COUNT):
                return False
    return True
