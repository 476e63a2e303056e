"""The HTTP door's logic: an OpenAI chat request -> a GenerateRequest and a checked plan -> the one MoA
engine the gRPC API uses -> an OpenAI completion or its chunks.

A model name is a recipe (MoA) or, when no recipe has that name, a plain backend passed through to
that one model (a plan with no proposer layers), so a client compares MoA with a single proposer
through the same door. Request sampling maps onto the aggregator's, as GenerateRequest's
aggregator_sampling does. Errors are `RpcError`s, as in the gRPC API; `http_error` maps them.
"""
from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from pydantic import BaseModel, ValidationError

from moaa.services.common.errors import InvalidArgument, RpcError
from moaa.services.common.validation import check_max_tokens, merge_sampling, messages_to_dicts, sampling_overrides
from moaa.services.config import AgentConfig, MoaaConfig, RecipeConfig, SamplingConfig
from moaa.services.gateway.engine import MoAEngine
from moaa.services.gateway.plan import Agent, Plan, make_plan
from moaa.v1 import common_pb2, gateway_pb2

from . import protocol as p

# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: (499, "cancelled", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable", "too_few_answers"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", "deadline_exceeded"),
}
RETRY_AFTER_S = 1  # what a 429 asks the client to wait
M = TypeVar("M", bound=BaseModel)


class HttpError(RpcError):
    """An RpcError that also names the request field at fault (OpenAI's `param`)."""

    def __init__(self, message: str, code: grpc.StatusCode, param: str | None = None):
        super().__init__(message, code)
        self.param = param


def http_error(code: grpc.StatusCode, message: str, param: str | None = None) -> tuple[int, p.ErrorResponse]:
    status, kind, ecode = _HTTP.get(code, (500, "server_error", None))
    return status, p.ErrorResponse(error=p.ErrorInfo(message=message, type=kind, param=param, code=ecode))


def validated(model: type[M], body: Any) -> M:
    """A request body as `model`, or a 400 naming the field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        param, msg = p.describe_validation(err)
        raise HttpError(msg, grpc.StatusCode.INVALID_ARGUMENT, param) from None


def sse(model: BaseModel, event: str | None = None) -> bytes:
    """One server-sent event; `event:` names it where the API does (the Responses API)."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + model.model_dump_json().encode() + b"\n\n"


@dataclass
class Call:
    """One checked request: its plan, and what the answer needs to know."""

    request: p.ChatCompletionRequest
    plan: Plan
    kind: str                      # "recipe" | "backend"
    deadline: float | None         # time.monotonic() seconds
    created: int
    source: Any = None             # the request as its API sent it, where that is not chat completions

    @property
    def id(self) -> str:
        return f"chatcmpl-{self.plan.request_id}"


def leading_system_merged(messages: list[p.ChatMessage]) -> tuple[list[p.ChatMessage], list[int]]:
    """OpenAI takes several system (or `developer`, its newer name) messages; the engine one, first. The
    leading ones become that one, joined by blank lines (as the Responses API's instructions and system items
    are); one later in the conversation stays the engine's 400. Also returns each message's index in the
    request, so errors name the request's own messages."""
    n = 0
    while n < len(messages) and messages[n].role in ("system", "developer"):
        n += 1
    if n <= 1:
        return list(messages), list(range(len(messages)))
    system = p.ChatMessage(role="system", content="\n\n".join(m.text() for m in messages[:n]))
    return [system, *messages[n:]], [0, *range(n, len(messages))]


def _to_generate_request(req: p.ChatCompletionRequest, messages: list[p.ChatMessage],
                         rid: str) -> gateway_pb2.GenerateRequest:
    """`req` with `messages`, its messages as the engine takes them (leading_system_merged)."""
    out = gateway_pb2.GenerateRequest(request_id=rid, recipe=req.model, metadata=req.metadata or {})
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        out.messages.append(common_pb2.Message(role=role, content=m.text(), name=m.name or ""))
    s = out.aggregator_sampling
    for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            setattr(s, name, value)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None:
        s.max_tokens = max_tokens
    s.stop.extend(req.stop_list())
    if req.seed is not None:   # a seeded call is reproducible: the proposers draw from it too (plan: seed + i)
        out.proposer_sampling.seed = req.seed
    if req.moaa is not None:
        for name in ("min_proposers", "first_k", "layer_deadline_s"):
            value = getattr(req.moaa, name)
            if value is not None:
                setattr(out, name, value)
    return out


class ChatServing:
    """The HTTP door's calls, over the engine the gRPC servicer uses."""

    def __init__(self, cfg: MoaaConfig, engine: MoAEngine):
        self.cfg = cfg
        self.engine = engine
        self.max_prompt_chars = cfg.gateway.max_prompt_chars
        self.loaded = int(time.time())   # the models' `created`: when this gateway read its config
        # a plain backend answers as a recipe with no proposer layers
        self._passthrough = {name: RecipeConfig(proposers=[AgentConfig(model=name)], aggregator=AgentConfig(model=name))
                             for name in cfg.backends if name not in cfg.recipes}

    def models(self) -> p.ModelList:
        cards = [p.ModelCard(id=n, created=self.loaded, owned_by="moaa", moaa={
            "kind": "recipe", "proposers": [a.model for a in r.proposers], "aggregator": r.aggregator.model,
            "layers": r.layers}) for n, r in self.cfg.recipes.items()]
        cards += [p.ModelCard(id=n, created=self.loaded, owned_by="moaa-backend", moaa={"kind": "backend", "passthrough": True})
                  for n in self._passthrough]
        return p.ModelList(data=cards)

    def model(self, name: str) -> p.ModelCard:
        """GET /v1/models/{name}: its card, or the unknown-model 404."""
        card = next((c for c in self.models().data if c.id == name), None)
        if card is None:
            raise self._unknown_model(name)
        return card

    def _unknown_model(self, name: str) -> HttpError:
        known = ", ".join([*self.cfg.recipes, *self._passthrough])
        return HttpError(f"model {name!r} does not exist: use a recipe or backend of GET /v1/models ({known})",
                         grpc.StatusCode.NOT_FOUND, "model")

    def check(self, req: p.ChatCompletionRequest, rid: str) -> Call:
        """The plan of a request, or an HttpError naming the field to change."""
        bad = req.unsupported()
        if bad is not None:
            raise HttpError(bad[1], grpc.StatusCode.INVALID_ARGUMENT, bad[0])
        messages, where = leading_system_merged(req.messages)
        greq = _to_generate_request(req, messages, rid)
        if req.model in self.cfg.recipes:
            kind = "recipe"
            plan = _plan_or_400(lambda: make_plan(self.cfg, greq, rid, self.max_prompt_chars), where, req.tokens_field)
        elif req.model in self._passthrough:
            kind = "backend"
            if req.moaa is not None and (req.moaa.min_proposers or req.moaa.first_k or req.moaa.layer_deadline_s):
                raise HttpError(f"model {req.model!r} is a plain backend: moaa.min_proposers, first_k and "
                                "layer_deadline_s apply to recipes only", grpc.StatusCode.INVALID_ARGUMENT, "moaa")
            plan = _plan_or_400(lambda: self._passthrough_plan(greq, rid), where, req.tokens_field)
        else:
            raise self._unknown_model(req.model)
        timeout = req.moaa.timeout_s if req.moaa is not None else None
        deadline = None if timeout is None else time.monotonic() + timeout
        return Call(req, plan, kind, deadline, int(time.time()))

    def _passthrough_plan(self, greq: gateway_pb2.GenerateRequest, rid: str) -> Plan:
        conversation = messages_to_dicts(greq.messages, max_chars=self.max_prompt_chars, ends_with_user=False)
        over = sampling_overrides(greq.aggregator_sampling, field="aggregator_sampling")
        # the bound Sample and the recipes keep: a backend is no looser for being reached through the door
        check_max_tokens(over.get("max_tokens"), model=greq.recipe, field="aggregator_sampling",
                         context_window=self.cfg.backends[greq.recipe].context_window)
        recipe = self._passthrough[greq.recipe]
        agent = Agent(greq.recipe, None, merge_sampling(SamplingConfig(), over))
        return Plan(request_id=rid, recipe_name="", recipe=recipe, conversation=conversation, proposers=[],
                    aggregator=agent, layers=0, min_proposers=0, first_k=None, layer_deadline_s=None,
                    metadata=dict(greq.metadata))

    async def events(self, call: Call, started: float, deltas: bool) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        """The engine's events; past the call's deadline, DEADLINE_EXCEEDED (the engine's requests cancelled).
        A request the models refuse as sent is the engine's INVALID_ARGUMENT (a 400 here)."""
        run = self.engine.run(call.plan, call.deadline, started, deltas=deltas)
        try:
            async for ev in run:
                yield ev
        except RpcError as err:
            # a backend timing out at our deadline is the deadline, not a failed backend
            if call.deadline is not None and time.monotonic() >= call.deadline - 0.01:
                raise RpcError(f"the call's deadline of {call.request.moaa.timeout_s:g} s passed ({err})",
                               grpc.StatusCode.DEADLINE_EXCEEDED) from None
            raise
        finally:
            await run.aclose()

    # -- answers -------------------------------------------------------------------------------------

    def extension(self, call: Call, final: gateway_pb2.GenerateResponse) -> dict:
        """The `moaa` object: the GenerateResponse without the answer's text (that is the message)."""
        ext = json_format.MessageToDict(final, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True, unquote_int64_if_possible=True)
        ext.pop("text", None)
        ext["kind"] = call.kind
        return ext

    @staticmethod
    def usage(final: gateway_pb2.GenerateResponse) -> p.Usage:
        """The sum over every model the call used."""
        pt = sum(u.usage.prompt_tokens for u in final.usage)
        ct = sum(u.usage.completion_tokens for u in final.usage)
        return p.Usage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct)

    def completion(self, call: Call, final: gateway_pb2.GenerateResponse) -> p.ChatCompletion:
        return p.ChatCompletion(
            id=call.id, created=call.created, model=call.request.model, usage=self.usage(final),
            choices=[p.Choice(message=p.AssistantMessage(content=final.text),
                              finish_reason=p.openai_finish_reason(final.finish_reason))],
            moaa=self.extension(call, final))

    def chunk(self, call: Call, *, content: str | None = None, role: bool = False, finish: str | None = None,
              final: gateway_pb2.GenerateResponse | None = None) -> p.ChatCompletionChunk:
        delta = p.Delta(role="assistant" if role else None, content=content)
        kind = p.ChatCompletionChunkWithUsage if call.request.include_usage else p.ChatCompletionChunk
        return kind(
            id=call.id, created=call.created, model=call.request.model,
            choices=[p.ChunkChoice(delta=delta, finish_reason=finish)],
            moaa=None if final is None else self.extension(call, final))

    def usage_chunk(self, call: Call, final: gateway_pb2.GenerateResponse) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(id=call.id, created=call.created, model=call.request.model, choices=[],
                                     usage=self.usage(final))

    def stream(self, call: Call) -> ChatStream:
        return ChatStream(self, call)


class ChatStream:
    """What a streamed chat completion writes for each engine event (the router sends it): chunks, a last
    chunk with finish_reason and the `moaa` object, the usage chunk when asked for, then [DONE]."""

    def __init__(self, serving: ChatServing, call: Call):
        self.serving, self.call = serving, call

    def start(self) -> list[bytes]:
        return [sse(self.serving.chunk(self.call, role=True, content=""))]

    def delta(self, text: str) -> list[bytes]:
        return [sse(self.serving.chunk(self.call, content=text))]

    def final(self, final: gateway_pb2.GenerateResponse) -> list[bytes]:
        out = [sse(self.serving.chunk(self.call, finish=p.openai_finish_reason(final.finish_reason), final=final))]
        if self.call.request.include_usage:
            out.append(sse(self.serving.usage_chunk(self.call, final)))
        return out

    def failed(self, code: grpc.StatusCode, message: str) -> list[bytes]:
        """An error after the answer started: OpenAI's error body as an event."""
        return [sse(http_error(code, message)[1])]

    def end(self) -> list[bytes]:
        return [b"data: [DONE]\n\n"]


def _plan_or_400(make, where: list[int], tokens_field: str = "max_tokens") -> Plan:
    """make_plan's InvalidArgument, with `param` named from the message's leading field and `messages[k]`
    the request's own index (`where`: leading system messages were merged); max_tokens said as the field the
    request sent (`tokens_field`: max_completion_tokens)."""
    try:
        return make()
    except InvalidArgument as err:
        msg = re.sub(r"messages\[(\d+)\]", lambda m: f"messages[{where[int(m[1])]}]" if int(m[1]) < len(where)
                     else m[0], str(err))
        head = msg.split(" ", 1)[0].split("=", 1)[0].split("[", 1)[0].split(".", 1)[0]
        param = "messages" if head in ("messages", "the") and "messages" in msg else None
        if head == "aggregator_sampling":  # our mapping's name for the request's own sampling fields
            field = msg.split(" ", 1)[0].split("=", 1)[0].split(".", 1)[-1]
            msg, param = msg.replace("aggregator_sampling.", "", 1), field
            if param == "max_tokens" and tokens_field != param:
                msg, param = msg.replace("max_tokens", tokens_field, 1), tokens_field
        elif head in ("min_proposers", "first_k", "layer_deadline_s"):
            msg, param = "moaa." + msg, "moaa"
        raise HttpError(msg, grpc.StatusCode.INVALID_ARGUMENT, param) from None
