"""ChatStream: the caller's side of a streamed chat call."""
from __future__ import annotations

import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncIterator

from .errors import BackendError
from .protocol import RESTART, ChatChunk, Usage

if TYPE_CHECKING:
    from .client import BackendClient


class _StreamState:
    """What a ChatStream has seen so far. Kept apart from ChatStream so that the generator does not
    reference the stream object: dropping the stream then frees the generator at once, and asyncio
    closes it (and with it the HTTP connection) without waiting for the cycle collector."""

    def __init__(self, model: str):
        self.model = model
        self.endpoint = ""
        self.attempts = 0
        self.text = ""
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.ttft_s: float | None = None
        self.latency_s = 0.0
        self.t0 = time.monotonic()
        self.retry: dict[str, Any] = {}  # shared with _events: endpoint, attempts, committed


async def _stream_chunks(client: BackendClient, body: dict, deadline: float,
                         st: _StreamState) -> AsyncIterator[ChatChunk]:
    async with aclosing(client._events(body, deadline, st.retry)) as events:
        async for batch in events:
            if batch is RESTART:  # a retry after a role-only chunk: the caller saw nothing yet
                st.ttft_s = None
                continue
            st.endpoint = st.retry.get("endpoint", "")
            st.attempts = st.retry.get("attempts", 1)
            if st.ttft_s is None:
                st.ttft_s = time.monotonic() - st.t0
            for ev in batch:
                usage = Usage.from_dict(ev["usage"]) if ev.get("usage") else None
                if usage is not None:
                    st.usage = usage
                for ch in ev.get("choices") or ():
                    delta = ch.get("delta")
                    piece = (delta and delta.get("content")) or ch.get("text") or ""
                    fin = ch.get("finish_reason")
                    st.text += piece
                    st.finish_reason = fin or st.finish_reason
                    if piece or fin:
                        st.retry["committed"] = True
                        yield ChatChunk(piece, fin, None, ch.get("index", 0))
                if usage is not None:
                    st.retry["committed"] = True
                    yield ChatChunk("", st.finish_reason, usage)
    st.latency_s = time.monotonic() - st.t0


class ChatStream:
    """Async iterator of ChatChunk. Breaking out of `async for` or aclose() closes the HTTP stream;
    `async with client.stream_chat(...) as s:` closes it at once. After iterating, the attributes
    model, endpoint, attempts, text, finish_reason, usage, ttft_s and latency_s describe the call."""

    def __init__(self, client: BackendClient, body: dict, deadline: float):
        self._st = _StreamState(client.name)
        self._gen = _stream_chunks(client, body, deadline, self._st)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_st"], name)

    def __aiter__(self) -> "ChatStream":
        return self

    async def __anext__(self) -> ChatChunk:
        try:
            return await self._gen.__anext__()
        except BackendError:
            st = self._st
            st.endpoint = st.retry.get("endpoint", st.endpoint)
            st.attempts = st.retry.get("attempts", st.attempts)
            raise

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> "ChatStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
