"""Server-sent events as OpenAI-compatible servers send them (aiohttp has no client-side SSE parser).

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
