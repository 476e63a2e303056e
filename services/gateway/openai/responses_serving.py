"""The Responses API over the chat-completions serving: a Responses request becomes the chat request the
chat path builds (instructions and input as messages, max_output_tokens as max_completion_tokens), is
checked, planned and run by ChatServing, and its result is written as a Response object or as the
Responses stream's events. One serving path: usage, the `moaa` object, errors and deadlines are the chat
path's.
"""
from __future__ import annotations

import re
import time

import grpc
from pydantic import BaseModel, ConfigDict

from moaa.v1 import gateway_pb2

from . import protocol as p
from . import responses_protocol as rp
from .serving import Call, ChatServing, HttpError, http_error, leading_system_merged, sse, validated


def to_messages(req: rp.ResponsesRequest) -> tuple[list[p.ChatMessage], list[str]]:
    """The chat messages of a request, and where each came from ('instructions', 'input[2]') to name it
    in errors. `instructions` and leading system/developer items make the one system message, by the chat
    path's own rule (leading_system_merged)."""
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    messages, where = [], []
    if req.instructions:
        messages.append(p.ChatMessage(role="system", content=req.instructions))
        where.append("instructions")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "item_reference":   # what a client that believes in stored responses sends for an earlier answer
            raise HttpError(f"input[{i}] is an item_reference to {item.get('id')!r}: moaa stores no responses, so "
                            "send the item itself (the Vercel AI SDK does with providerOptions: {openai: {store: "
                            "false}})", grpc.StatusCode.INVALID_ARGUMENT, f"input[{i}]")
        if kind != "message":
            raise HttpError(f"input[{i}] is {'a ' + repr(kind) if kind else 'not a message'} item: moaa takes message "
                            "items with text content only (roles user, assistant, system, developer); send tool "
                            "results or files as text in a message", grpc.StatusCode.INVALID_ARGUMENT, f"input[{i}]")
        content = item.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype not in rp.PART_TYPES:
                raise HttpError(f"input[{i}].content[{j}] is a {ptype!r} part: moaa passes text only; use "
                                f"{' or '.join(rp.PART_TYPES)} parts (or a string)", grpc.StatusCode.INVALID_ARGUMENT,
                                f"input[{i}].content[{j}]")
        try:
            msg = validated(rp.InputMessage, item)
        except HttpError as err:
            raise HttpError(f"input[{i}].{err}", err.code, f"input[{i}].{err.param}") from None
        messages.append(p.ChatMessage(role=msg.role, content=msg.text()))
        where.append("input" if isinstance(req.input, str) else f"input[{i}]")
    merged, index = leading_system_merged(messages)
    return merged, [where[k] for k in index]


def _in_input_terms(err: HttpError, where: list[str]) -> HttpError:
    """A chat-path error about `messages[k]` or max_tokens, said in the Responses request's own fields."""
    param = err.param or ""
    if param.startswith("messages"):
        msg = re.sub(r"messages\[(\d+)\]", lambda m: where[int(m[1])] if int(m[1]) < len(where) else m[0], str(err))
        return HttpError(msg.replace("messages", "input"), err.code, "input")
    if param in ("max_tokens", "max_completion_tokens"):
        return HttpError(str(err).replace(param, "max_output_tokens", 1), err.code, "max_output_tokens")
    return err


class ResponsesServing:
    """POST /v1/responses over the chat serving (the same engine, limits and `moaa` object)."""

    def __init__(self, chat: ChatServing):
        self.chat = chat

    def check(self, req: rp.ResponsesRequest, rid: str) -> Call:
        """The checked call of a request, or an HttpError naming the Responses field to change."""
        bad = req.unsupported()
        if bad is not None:
            raise HttpError(bad[1], grpc.StatusCode.INVALID_ARGUMENT, bad[0])
        messages, where = to_messages(req)
        if not messages:
            raise HttpError("input has no message: send the conversation, ending with a user message (or a string)",
                            grpc.StatusCode.INVALID_ARGUMENT, "input")
        chat = p.ChatCompletionRequest(
            model=req.model, messages=messages, stream=req.stream,
            temperature=req.temperature, top_p=req.top_p, max_completion_tokens=req.max_output_tokens,
            metadata=req.metadata, user=req.user, safety_identifier=req.safety_identifier,
            prompt_cache_key=req.prompt_cache_key, service_tier=req.service_tier, moaa=req.moaa)
        try:
            call = self.chat.check(chat, rid)
        except HttpError as err:
            raise _in_input_terms(err, where) from None
        call.source = req
        return call

    # -- answers -------------------------------------------------------------------------------------

    @staticmethod
    def message(call: Call, status: str, text: str | None) -> rp.OutputMessage:
        return rp.OutputMessage(id=f"msg_{call.plan.request_id}", status=status,
                                content=[] if text is None else [rp.OutputText(text=text)])

    def response(self, call: Call, final: gateway_pb2.GenerateResponse | None = None, *,
                 error: tuple[grpc.StatusCode, str] | None = None, text: str = "") -> rp.Response:
        """The Response object: in progress (neither given), completed or incomplete (`final`), or failed
        (`error`, with the text streamed so far)."""
        req: rp.ResponsesRequest = call.source
        status, output, usage, ext, incomplete, failure = "in_progress", [], None, None, None, None
        if final is not None:
            # the aggregator stopped at max_output_tokens, or its backend's filter cut it: OpenAI's two reasons
            why = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(final.finish_reason)
            status = "incomplete" if why else "completed"
            incomplete = rp.IncompleteDetails(reason=why) if why else None
            output = [self.message(call, status, final.text)]
            u = self.chat.usage(final)
            usage = rp.ResponseUsage(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens,
                                     total_tokens=u.total_tokens)
            ext = self.chat.extension(call, final)
        elif error is not None:
            status, (code, msg) = "failed", error
            http = http_error(code, msg)[0]
            # OpenAI's codes for a failed response: ours (too few answers, deadline) are server errors
            failure = rp.ResponseError(message=msg, code="rate_limit_exceeded" if http == 429
                                       else "invalid_prompt" if http == 400 else "server_error")
            output = [self.message(call, "incomplete", text)] if text else []
        return rp.Response(
            id=f"resp_{call.plan.request_id}", created_at=call.created, status=status, model=req.model,
            completed_at=int(time.time()) if final is not None else None, output=output, usage=usage,
            incomplete_details=incomplete, error=failure, instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
            metadata=req.metadata or {}, user=req.user, safety_identifier=req.safety_identifier, moaa=ext)

    def stream(self, call: Call) -> ResponsesStream:
        return ResponsesStream(self, call)


class ResponsesStream:
    """The Responses stream of one call: response.created, response.in_progress, output_item.added and
    content_part.added with the first delta; an output_text.delta per engine delta; then output_text.done,
    content_part.done, output_item.done and response.completed (response.incomplete when cut at
    max_output_tokens or by the backend's content filter), each numbered by sequence_number. A failure after the start is response.failed."""

    def __init__(self, serving: ResponsesServing, call: Call):
        self.serving, self.call = serving, call
        self.seq = 0
        self.text: list[str] = []
        self.item = f"msg_{call.plan.request_id}"

    def _event(self, kind: str, **fields) -> bytes:
        event = _Event(type=kind, sequence_number=self.seq, **fields)
        self.seq += 1
        return sse(event, kind)

    def _at(self) -> dict:
        return {"item_id": self.item, "output_index": 0, "content_index": 0}

    def start(self) -> list[bytes]:
        resp = self.serving.response(self.call)
        return [self._event("response.created", response=resp), self._event("response.in_progress", response=resp),
                self._event("response.output_item.added", output_index=0,
                            item=self.serving.message(self.call, "in_progress", None)),
                self._event("response.content_part.added", **self._at(), part=rp.OutputText(text=""))]

    def delta(self, text: str) -> list[bytes]:
        self.text.append(text)
        return [self._event("response.output_text.delta", **self._at(), delta=text, logprobs=[])]

    def final(self, final: gateway_pb2.GenerateResponse) -> list[bytes]:
        resp = self.serving.response(self.call, final)
        item = resp.output[0]
        return [self._event("response.output_text.done", **self._at(), text=final.text, logprobs=[]),
                self._event("response.content_part.done", **self._at(), part=item.content[0]),
                self._event("response.output_item.done", output_index=0, item=item),
                self._event(f"response.{resp.status}", response=resp)]

    def failed(self, code: grpc.StatusCode, message: str) -> list[bytes]:
        resp = self.serving.response(self.call, error=(code, message), text="".join(self.text))
        return [self._event("response.failed", response=resp)]

    def end(self) -> list[bytes]:
        return []


class _Event(BaseModel):
    """One event of the Responses stream; its fields depend on its type."""

    model_config = ConfigDict(extra="allow")
    type: str
    sequence_number: int
