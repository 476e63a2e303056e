"""OpenAI Responses API request and response models (`POST /v1/responses`), as the HTTP door accepts and
answers them: stateless, text in and text out.

A request maps onto the chat-completions request (responses_serving.py), so both APIs share one set of
checks, one serving path and the same `moaa` extension. Fields we do not implement answer 400 naming
them; moaa keeps no state, so what builds on stored responses (`previous_response_id`, `conversation`,
`background`) is refused with what to send instead.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from moaa.prompts import PART_SEPARATOR

from .protocol import CacheHint, MaxTokens, MoaaOptions, SafetyIdentifier, Temperature, TopP, _Strict

PART_TYPES = ("input_text", "output_text")
# `include` values that name output a moaa answer never has (reasoning items, tool calls, input images, all
# refused or absent): including it adds nothing, so they are accepted (inspect-ai asks a model it does not know
# for reasoning.encrypted_content, with store=false). The one left, message.output_text.logprobs, is a 400.
NOTHING_TO_INCLUDE = frozenset({
    "reasoning.encrypted_content", "web_search_call.results", "web_search_call.action.sources",
    "file_search_call.results", "code_interpreter_call.outputs", "computer_call_output.output.image_url",
    "message.input_image.image_url"})


class TextFormat(BaseModel):
    type: str  # json_schema's name/schema/strict ride along; only "text" is served


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: str | None = None


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None  # moaa pads no deltas: nothing to turn off


class InputPart(_Strict):
    """A text part of a message item, as sent or as the SDK writes an answer back (`output_text`)."""

    type: Literal["input_text", "output_text"]
    text: str
    prompt_cache_breakpoint: CacheHint | None = None
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Strict):
    """A message item: `{"role", "content"}` (EasyInputMessage) or an output message written back."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return PART_SEPARATOR.join(p.text for p in self.content)


class ResponsesRequest(_Strict):
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]  # items are checked one by one (responses_serving.to_messages)
    instructions: str | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    moaa: MoaaOptions | None = None
    # accepted and not used: identifiers and hints that do not change the answer
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: SafetyIdentifier | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: CacheHint | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None
    store: bool | None = None  # accepted either way: moaa stores no response (nothing to retrieve later)
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    truncation: str | None = None
    # accepted only with the value that means "not used"; anything else is a 400 naming the field
    previous_response_id: str | None = None
    conversation: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    prompt: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, message) for the first field set to something we do not implement."""
        stateless = "moaa keeps no state between calls: send the whole conversation in `input`"
        if self.previous_response_id is not None:
            return "previous_response_id", f"previous_response_id is not supported: {stateless}"
        if self.conversation is not None:
            return "conversation", f"conversation is not supported: {stateless}"
        if self.background:
            return "background", ("background=true is not supported: moaa stores no responses to poll; "
                                  "call without background (stream=true to see the answer as it is written)")
        if self.tools:
            return "tools", ("tools are not supported: a MoA answer is the aggregator's free text, never a tool "
                             "call; remove tools")
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported: remove it (no tools are called)"
        if self.reasoning and any(v is not None for v in self.reasoning.values()):
            return "reasoning", ("reasoning is not supported: a MoA answer is the aggregator's free text, with no "
                                 "reasoning effort or summary to set; remove reasoning")
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            return "text.format", (f"text.format type {fmt.type!r} is not supported: a MoA answer is the "
                                   "aggregator's free text, which the gateway cannot constrain to JSON; use 'text' "
                                   "(or leave it out) and ask for JSON in the prompt")
        if self.text is not None and self.text.verbosity not in (None, "medium"):   # medium: OpenAI's default
            return "text.verbosity", (f"text.verbosity={self.text.verbosity!r} is not supported: remove it (ask for a "
                                      "shorter answer in the prompt, or set max_output_tokens)")
        asked = [x for x in self.include or () if x not in NOTHING_TO_INCLUDE]
        if asked:
            return "include", (f"include {asked!r} is not supported: the answer is text only (no logprobs to "
                               "include); remove it")
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs is not supported: remove it"
        if self.prompt is not None:
            return "prompt", "prompt (a stored prompt template) is not supported: send the text in instructions/input"
        if self.truncation not in (None, "disabled"):
            return "truncation", (f"truncation={self.truncation!r} is not supported: moaa drops no input items; use "
                                  "'disabled' (or leave it out) and shorten the input yourself")
        return None


# -- answers -----------------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    """The Response object; the fields the request set are echoed, as OpenAI does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputMessage]
    usage: ResponseUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    previous_response_id: None = None
    reasoning: None = None
    background: bool = False
    store: bool = False  # nothing is stored, whatever the request said
    moaa: dict[str, Any] | None = None
