"""Server-sent events as OpenAI-compatible servers send them (aiohttp has no client-side SSE parser),
and the shape check of the chat chunks they carry.

The parser is fed one line at a time so that the caller can put its own timeout on each read.
"""
from __future__ import annotations

import json

DONE = object()  # the `data: [DONE]` sentinel


class MalformedEvent(ValueError):
    """A `data:` payload that is not the JSON object the protocol promises."""


class SSEParser:
    """Collects `data:` lines into events; an empty line ends an event."""

    MAX_LINE = 16 << 20  # a "line" this long without a newline is not SSE

    def __init__(self) -> None:
        self._data: list[str] = []
        self._partial = b""

    def feed(self, data: bytes) -> list[object]:
        """Feeds raw bytes as they arrive (any split); returns the events they complete."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.MAX_LINE:
            raise MalformedEvent(f"stream line longer than {self.MAX_LINE} bytes")
        events: list[object] = []
        for line in lines:
            events.extend(self.feed_line(line))
        return events

    def feed_line(self, raw: bytes) -> list[object]:
        """Returns the events (parsed JSON dicts or DONE) that this line completes."""
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            return self._flush()
        if line.startswith(":"):
            return []  # comment / keep-alive
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return []  # event:, id:, retry: carry nothing we use

    def close(self) -> list[object]:
        """End of stream: a pending line and event without their newlines still count."""
        events = self.feed_line(self._partial) if self._partial else []
        self._partial = b""
        return events + self._flush()

    def _flush(self) -> list[object]:
        if not self._data:
            return []
        data = "\n".join(self._data)
        self._data = []
        if data.strip() == "[DONE]":
            return [DONE]
        try:
            obj = json.loads(data)
        except ValueError:
            # No excerpt: the payload is model output, which stays out of errors and logs.
            raise MalformedEvent(f"stream chunk of {len(data)} characters is not JSON") from None
        if not isinstance(obj, dict):
            raise MalformedEvent(f"stream chunk is JSON but not an object ({type(obj).__name__})")
        return [obj]


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
