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

    def __init__(self) -> None:
        self._data: list[str] = []

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
        """End of stream: a pending event without its blank line still counts."""
        return self._flush()

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
            raise MalformedEvent(f"stream chunk is not JSON: {data[:80]!r}") from None
        if not isinstance(obj, dict):
            raise MalformedEvent(f"stream chunk is not a JSON object: {data[:80]!r}")
        return [obj]
