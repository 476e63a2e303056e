"""Request validation shared by the gateway and the annotator.

Each check raises InvalidArgument with a message that names the field and says what to change.
"""
from __future__ import annotations

from moaa.idset import IdSet
from moaa.services.common.errors import InvalidArgument
from moaa.services.config import SamplingConfig

ROLES = ("system", "user", "assistant")
# OpenAI takes 4 stop strings; vLLM and transformers serve take any number, and harnesses send more (inspect-ai
# passes its stop_seqs as they are), so the bound is only a guard on work per generated token.
MAX_STOP = 16
MAX_SAMPLES = 64   # answers per prompt in one call: the gateway's Sample and `moaa sample --n`
TOKENS_WIRE_BOUND = 2**32   # SamplingParams.max_tokens is a uint32: only values below this can be sent
MIN_PROMPT_TOKENS = 16  # room a reply must leave in the context window for the prompt


def messages_to_dicts(messages, *, field: str = "messages", max_chars: int | None = None,
                      ends_with_user: bool = True) -> list[dict]:
    """Proto `Message`s -> OpenAI chat dicts, checked: not empty, known roles, a system message first only,
    and, with `ends_with_user`, the user's turn last. The gateway takes a trailing assistant message as
    OpenAI and vLLM do (an answer's prefix, such as lm-eval's gen_prefix: each backend's chat template reads
    it); a prompt to judge must end with the user's turn."""
    if not messages:
        raise InvalidArgument(f"{field} is empty: send at least one message with role 'user'")
    out: list[dict] = []
    total = 0
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise InvalidArgument(f"{field}[{i}].role is {m.role!r}: use one of {', '.join(ROLES)}")
        if m.role == "system" and i != 0:
            raise InvalidArgument(f"{field}[{i}] is a system message: only the first message may be a system message")
        if not m.content and m.role == "user":
            raise InvalidArgument(f"{field}[{i}].content is empty: a user message needs text")
        total += len(m.content)
        d = {"role": m.role, "content": m.content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    if ends_with_user and out[-1]["role"] != "user":
        raise InvalidArgument(f"the last message of {field} has role {out[-1]['role']!r}: it must be the user's turn")
    if not any(m["role"] == "user" for m in out):
        raise InvalidArgument(f"{field} has no user message: send the user's turn (role 'user')")
    if max_chars is not None and total > max_chars:
        raise InvalidArgument(f"{field} has {total} characters, over the limit of {max_chars}: "
                              "shorten the conversation or raise max_prompt_chars in the server config")
    return out


def sampling_overrides(params, *, field: str = "sampling") -> dict:
    """The fields set in a proto `SamplingParams`, range-checked; {} when none is set."""
    if params is None:
        return {}
    out: dict = {}
    checks = {
        "temperature": (0.0, 2.0, "between 0 and 2"),
        "top_p": (1e-9, 1.0, "in (0, 1]"),
        "presence_penalty": (-2.0, 2.0, "between -2 and 2"),
        "frequency_penalty": (-2.0, 2.0, "between -2 and 2"),
    }
    for name, (lo, hi, words) in checks.items():
        if params.HasField(name):
            value = getattr(params, name)
            if not (lo <= value <= hi) or value != value:
                raise InvalidArgument(f"{field}.{name}={value} is out of range: use a value {words}")
            out[name] = value
    if params.HasField("max_tokens"):
        if params.max_tokens < 1:
            raise InvalidArgument(f"{field}.max_tokens=0: use at least 1 (or leave it unset for the default)")
        out["max_tokens"] = params.max_tokens
    if params.HasField("seed"):
        out["seed"] = params.seed
    if params.stop:
        if len(params.stop) > MAX_STOP:
            raise InvalidArgument(f"{field}.stop has {len(params.stop)} entries: use at most {MAX_STOP}")
        if any(not s for s in params.stop):
            raise InvalidArgument(f"{field}.stop contains an empty string: remove it")
        out["stop"] = list(params.stop)
    return out


def merge_sampling(base: SamplingConfig, overrides: dict) -> SamplingConfig:
    """The recipe's sampling with the request's overrides applied."""
    if not overrides:
        return base
    return base.model_copy(update=overrides)


def check_max_tokens(value: int | None, *, model: str, context_window: int, field: str,
                     with_references: bool = False) -> None:
    """A requested max_tokens must fit the model's context window with room for the prompt; an agent
    that reads references (an aggregator, a proposer after layer 1) may spend at most half the window
    on its reply, or every reference would be cut down to its trim marker."""
    if value is None:
        return
    if with_references:
        limit, why = context_window // 2, "half the window: the rest holds the conversation and the references"
    else:
        limit, why = context_window - MIN_PROMPT_TOKENS, f"the window less {MIN_PROMPT_TOKENS} tokens for the prompt"
    limit = max(1, limit)
    if value > limit:
        raise InvalidArgument(f"{field}.max_tokens={value} is too large for model {model!r} with a "
                              f"{context_window}-token context window: use at most {limit} ({why})")


def check_item_id(item_id: str, seen: set[str] | IdSet, *, field: str = "id") -> None:
    """A stream item's id must be set and unique within the stream: results are matched to rows by it.
    Adds the id to `seen`; raises InvalidArgument (an item error, the stream goes on)."""
    if not item_id:
        raise InvalidArgument(f"{field} is empty: give every stream item a unique id (results are matched by it)")
    if item_id in seen:
        raise InvalidArgument(f"{field} {item_id!r} was already sent on this stream: give every item a unique id")
    seen.add(item_id)
