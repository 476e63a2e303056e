"""OpenAI chat-completions request and response models, as the HTTP door accepts and answers them.

Requests are strict: a field we do not implement answers 400 naming it instead of being ignored. The
`moaa` object is our extension: in a request (via the SDK's `extra_body`) the MoA knobs of
GenerateRequest, in a response the per-model usage, proposals, failures and latency per stage.
"""
from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from moaa.prompts import PART_SEPARATOR
from moaa.services.common.validation import MAX_STOP
# the wire types of GenerateRequest's fields (uint32, int64): past them protobuf raises, which is a 500
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# the sampling fields both APIs share (chat completions, Responses): one set of bounds
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
MaxTokens = Annotated[int, Field(ge=1, le=UINT32_MAX)]
SafetyIdentifier = Annotated[str, Field(max_length=128)]  # OpenAI's limit
# prompt-caching hints (request options, a text part's breakpoint): OpenAI's cache, nothing the answer depends
# on; taken as any object, since their keys grow with OpenAI's models
CacheHint = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: CacheHint | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # an answer's message as the SDK writes it back into the history (`message.model_dump()`): accepted
    # while empty, a 400 naming the field when set (only text is passed on)
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None
    tool_call_id: str | None = None   # a tool result's: refused with its role (ChatCompletionRequest.unsupported)

    def unsupported(self) -> str | None:
        """The first of the answer-only fields that is set."""
        return next((f for f in ("refusal", "tool_calls", "function_call", "audio", "annotations")
                     if getattr(self, f)), None)

    def text(self) -> str:
        if isinstance(self.content, list):
            return PART_SEPARATOR.join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(BaseModel):
    type: str


class Prediction(_Strict):
    """A predicted output: OpenAI's latency hint, which never changes the answer; accepted and not used."""

    type: Literal["content"]
    content: str | list[ContentPart]


class MoaaOptions(_Strict):
    """MoA knobs of GenerateRequest, for a recipe model only."""

    min_proposers: int | None = Field(None, ge=1, le=UINT32_MAX)
    first_k: int | None = Field(None, ge=1, le=UINT32_MAX)
    layer_deadline_s: float | None = Field(None, gt=0)
    timeout_s: float | None = Field(None, gt=0, description="deadline of the whole call (504 when it passes)")


class ChatCompletionRequest(_Strict):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False  # null as false, as vLLM takes it
    stream_options: StreamOptions | None = None
    # accepted and not used: identifiers and hints that, by OpenAI's own description, do not change the answer
    user: str | None = None
    safety_identifier: SafetyIdentifier | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: CacheHint | None = None
    prompt_cache_retention: str | None = None
    prediction: Prediction | None = None
    metadata: dict[str, str] | None = None
    moaa: MoaaOptions | None = None
    # accepted only with the value that means "not used"; anything else is a 400 naming the field
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    store: bool | None = None
    modalities: list[str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    audio: Any = None
    web_search_options: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something we do not implement."""
        for i, m in enumerate(self.messages):
            if m.role in ("tool", "function"):
                return f"messages[{i}].role", (f"messages[{i}] is a {m.role} result: no tools are called here; send "
                                               "what it says as text in a user message")
            field = m.unsupported()
            if field is not None:
                return f"messages[{i}].{field}", (f"messages[{i}].{field} is not supported: the gateway passes on "
                                                  f"text only, send the turn's text as content without {field}")
        if self.n is not None and self.n != 1:
            return "n", f"n={self.n} is not supported: a MoA call gives one answer, use n=1 (or leave it out)"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, (f"{name} is not supported: a MoA answer is the aggregator's free text, never a tool "
                              f"call nor JSON fitted to a schema; remove {name}")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} is not supported: remove it (no tools are called)"
        if self.logprobs:
            return "logprobs", "logprobs are not supported: remove logprobs (or set it to false)"
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs is not supported: remove it"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported: remove it"
        if self.store:
            return "store", "store=true is not supported: the gateway keeps no completions, remove store"
        if self.modalities is not None and set(self.modalities) - {"text"}:
            return "modalities", "modalities other than 'text' are not supported: use [\"text\"] or remove it"
        if self.audio is not None:
            return "audio", "audio output is not supported: the gateway answers with text only, remove audio"
        if self.service_tier not in (None, "auto", "default"):
            return "service_tier", (f"service_tier={self.service_tier!r} is not supported: the gateway has one tier, "
                                    "use 'auto' or 'default' (or leave it out)")
        if self.reasoning_effort is not None:
            return "reasoning_effort", ("reasoning_effort is not supported: a recipe's models take no reasoning "
                                        "effort, remove it")
        if self.verbosity not in (None, "medium"):   # medium: OpenAI's default, which asks for nothing
            return "verbosity", (f"verbosity={self.verbosity!r} is not supported: remove it (ask for a shorter "
                                 "answer in the prompt, or set max_tokens)")
        if self.web_search_options is not None:
            return "web_search_options", "web_search_options is not supported: the gateway searches nothing, remove it"
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:  # as OpenAI, vLLM
            return "stream_options", "stream_options is only allowed when stream is true: remove it, or set stream"
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            return "stream_options.continuous_usage_stats", (
                "stream_options.continuous_usage_stats is not supported: the usage of a MoA call is known when it "
                "ends, use include_usage for one usage chunk at the end")
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", (f"response_format type {self.response_format.type!r} is not supported: a "
                                       "MoA answer is the aggregator's free text, which the gateway cannot constrain "
                                       "to JSON; use 'text' (or leave it out) and ask for JSON in the prompt")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            return "max_completion_tokens", "max_tokens and max_completion_tokens differ: send one of them"
        stops = self.stop_list()
        if len(stops) > MAX_STOP:
            return "stop", f"stop has {len(stops)} strings: send at most {MAX_STOP}"
        if any(not s for s in stops):
            return "stop", "stop contains an empty string: remove it"
        return None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def tokens_field(self) -> str:
        """The field this request bounds the answer with, to name in an error about it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None and self.max_tokens is None \
            else "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def describe_validation(err: ValidationError) -> tuple[str | None, str]:
    """(param, message) of the first problem in a request body, in the client's field names."""
    errors = err.errors()
    e = errors[0]
    if not e["loc"] and e["type"] == "model_type":
        return None, "the request body must be a JSON object"
    if e["type"] == "string_type" and isinstance(e.get("input"), list) and len(errors) > 1:
        e = errors[1]  # content sent as parts: what is wrong in them, not that it is no string
    loc = [str(x) for x in e["loc"]]
    # the union branch pydantic tried ('str', 'list[ContentPart]') is noise in a field path; `stream` is a field
    loc = [x for x in loc if x != "str" and not x.startswith(("list[", "function-", "literal["))]
    path = "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc).lstrip(".") or None  # messages[0].role
    if e["type"] == "extra_forbidden":
        return path, f"unsupported field {path!r}: remove it (the gateway implements the chat fields it lists in its docs)"
    if e["type"] == "missing":
        return path, f"{path} is required"
    if e["type"] == "literal_error":  # e.g. a content part's type: say what was sent
        return path, f"{path} is {e['input']!r}: {e['msg']}"
    return path, f"{path}: {e['msg']}" if path else e["msg"]


# -- responses ---------------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def openai_finish_reason(backend_reason: str) -> str:
    """OpenAI's finish_reason for the backend's: `length` and `content_filter` as they are, any other end
    (vLLM's and OpenAI's `stop`, TGI's `eos_token` and `stop_sequence`, ...) is `stop`, a value typed clients
    accept; the backend's own word stays in the `moaa` object."""
    return backend_reason if backend_reason in ("length", "content_filter") else "stop"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    # as OpenAI writes them: typed clients read `refusal` as required (openai-node's ChatCompletionMessage)
    refusal: None = None
    annotations: list[Any] = Field(default_factory=list)


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    moaa: dict[str, Any] | None = None


class _Sparse(BaseModel):
    """Writes the fields named in `_omit_none` only when set, as OpenAI's stream does (a delta carries
    `role` in the first chunk only); the others always, null or not (`finish_reason` is null until the last)."""

    _omit_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        out = handler(self)
        for name in self._omit_none:
            if out.get(name) is None:
                out.pop(name, None)
        return out


class Delta(_Sparse):
    _omit_none = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: None = None


class ChatCompletionChunk(_Sparse):
    _omit_none = ("usage", "moaa")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    moaa: dict[str, Any] | None = None


class ChatCompletionChunkWithUsage(ChatCompletionChunk):
    """A chunk of a stream that asked for usage (`stream_options.include_usage`): OpenAI writes `usage: null`
    on every chunk but the usage chunk."""

    _omit_none = ("moaa",)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # a real time, as vLLM's: model pickers sort on it
    owned_by: str
    moaa: dict[str, Any]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
