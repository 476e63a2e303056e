"""Prompt loading: JSONL, Parquet or a local Hugging Face `datasets` folder -> validated prompt rows.

Recognised without mapping (the paper's sources, TRL's own formats and common public ones):
- `messages`: a list of {role, content} (UltraChat 200k, TRL conversational SFT rows, OpenAI chat logs:
  content may be a list of text parts, joined by newlines; the `developer` role is taken as `system`);
- `conversations`: ShareGPT's list of {from, value} (human -> user, gpt -> assistant, system);
- `data`: a list of strings, alternating user / assistant (the original UltraChat release);
- `prompt`: a string (UltraFeedback binarized) or a list of messages (TRL preference rows);
- `instruction` (UltraFeedback: its `completions` are ignored; Alpaca's `input` or Dolly's `context`, when
  not empty, is appended after a blank line, as Alpaca's own template does), `question`.
A trailing assistant turn is dropped: the pipeline writes that turn. Earlier turns are kept.
Files: those `moaa/records.py` reads (JSON Lines, a JSON array, Parquet, a saved `datasets` folder).

The one row-id rule (`row_id`): a hash of the conversation (sha256[:16], stable across runs and
machines), unless `--map id=FIELD` names a column that already holds ids, or the caller keeps the file's
own ids (`keep_ids`: `moaa sample`, whose input rows already carry the pipeline's or the user's ids). Broken lines, missing fields and duplicate ids are collected with
their line numbers: one readable error, or with `skip_invalid` a list of what was skipped.
"""
from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator

from moaa.errors import UserError
from moaa.idset import IdSet
from moaa.records import records

ROLES = ("system", "user", "assistant")
# Other names of those roles: OpenAI's `developer` (its newer name for system), ShareGPT's `from` values.
ROLE_ALIASES = {"developer": "system", "human": "user", "gpt": "assistant"}
# Field names tried in order when no mapping is given.
AUTO_FIELDS = ("messages", "conversations", "data", "prompt", "instruction", "question")
MAPPABLE = ("prompt", "messages", "id", "system")
INSTRUCTION_INPUTS = ("input", "context")   # what an instruction works on: Alpaca's `input`, Dolly's `context`
MAX_LISTED = 5  # invalid rows named in one error line
KEPT_INVALID = 20  # invalid rows kept with their reasons for the summary (all are counted)


@dataclass
class PromptRow:
    id: str
    messages: list[dict[str, str]]
    line: int                      # 1-based line (JSONL) or row number (Parquet, datasets)
    source_id: str | None = None   # the file's own id column, kept for provenance

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": self.messages}
        if self.source_id is not None:
            out["source_id"] = self.source_id
        return out


def content_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a conversation: sha256 of its canonical JSON (roles and contents only)."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def row_id(messages: list[dict[str, str]], source_id: str | None, mapping: dict[str, str], keep_ids: bool) -> str:
    """The id a prompt row is keyed by everywhere downstream (samples, pairs, eval)."""
    if mapping.get("id") or (keep_ids and source_id is not None):
        return source_id
    return content_id(messages)


def held_out_ids(ids: Iterable[str], fraction: float, salt: str, cap: int | None = None, *,
                 count: int | None = None) -> set[str]:
    """A stable held-out share of ids (at most `cap`), chosen by a hash of salt and id: the same on every run
    and machine (none below 4 ids: too few to spare any). Given `count` (how many `ids` yields), `ids` may be
    a one-pass stream: only the chosen ids are held, never all of them."""
    if count is None:
        ids = list(ids)
        count = len(ids)
    n = round(count * fraction) if count >= 4 else 0
    n = n if cap is None else min(n, cap)
    return set(heapq.nsmallest(n, ids, key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).digest()))


def parse_mapping(items: list[str] | None) -> dict[str, str]:
    """`["prompt=question", "id=qid"]` -> {"prompt": "question", "id": "qid"}."""
    mapping: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value or key not in MAPPABLE:
            raise UserError(f"bad --map {item!r}: use KEY=FIELD with KEY one of {', '.join(MAPPABLE)}")
        mapping[key] = value
    return mapping


class RowError(ValueError):
    """What is wrong with one input row (the loaders collect these with their line numbers)."""


def as_messages(value: Any, fieldname: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"field {fieldname!r} is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(f"field {fieldname!r} must be a string or a non-empty list")
    if all(isinstance(v, str) for v in value):  # UltraChat's `data`: alternating user / assistant
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": v} for i, v in enumerate(value)]
    msgs = []
    for i, m in enumerate(value):
        if isinstance(m, dict) and "role" not in m and "from" in m and "value" in m:   # ShareGPT
            m = {"role": m["from"], "content": m["value"]}
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError(f"{fieldname}[{i}] is not a {{role, content}} message")
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role not in ROLES:
            raise RowError(f"{fieldname}[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        msgs.append({"role": role, "content": message_text(m["content"], f"{fieldname}[{i}]")})
    return msgs


def answer_key(text: str) -> str:
    """What makes two answers the same: their text, leading and trailing whitespace aside. The annotator refuses
    two candidates of one key; `moaa annotate`, Sample, Generate's annotation, judge-eval and eval send or
    judge each key once (one rule, so a caller never sends what the annotator calls the same)."""
    return text.strip()


PART_SEPARATOR = "\n"   # between a message's text parts, as vLLM's chat endpoint joins them


def message_text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts when every part is text (joined by newlines,
    as vLLM's chat endpoint joins them). Other parts (images, audio) are refused: prompts here are text. The
    one rule for prompts and for training rows (`trainer/data.py`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RowError(f"{where} content has a {kind or type(part).__name__!r} part; only text parts "
                                "({\"type\": \"text\", \"text\": ...}) can be used")
            texts.append(part["text"])
        return PART_SEPARATOR.join(texts)
    raise RowError(f"{where} content is not a string or a list of text parts")


def _to_prompt(msgs: list[dict[str, str]], fieldname: str) -> list[dict[str, str]]:
    """Drop a trailing assistant turn; check the rest ends with a non-empty user turn."""
    while msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    if not msgs or msgs[-1]["role"] != "user":
        raise RowError(f"field {fieldname!r} has no user turn to answer")
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise RowError(f"{fieldname}[{i}] ({m['role']}) is empty")
    return msgs


def row_to_prompt(record: Any, mapping: dict[str, str]) -> tuple[list[dict[str, str]], str | None]:
    """One input record -> (prompt messages, the record's own id or None). Raises RowError."""
    if not isinstance(record, dict):
        raise RowError("not a JSON object")
    if "prompt" in mapping or "messages" in mapping:
        name = mapping.get("messages") or mapping["prompt"]
        if name not in record:
            raise RowError(f"missing field {name!r} (from --map)")
    else:
        name = next((f for f in AUTO_FIELDS if record.get(f) is not None), None)
        if name is None:
            raise RowError(f"missing prompt field (expected one of {', '.join(AUTO_FIELDS)}; "
                            "or name one with --map prompt=FIELD)")
    value = record[name]
    extra = next((record[k] for k in INSTRUCTION_INPUTS if record.get(k)), None) if name == "instruction" else None
    if isinstance(value, str) and isinstance(extra, str) and extra.strip():   # Alpaca, Dolly: instruction + input
        value = f"{value}\n\n{extra}"
    msgs = _to_prompt(as_messages(value, name), name)
    system_field = mapping.get("system")
    if system_field and record.get(system_field) and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": str(record[system_field])}] + msgs
    id_field = mapping.get("id")
    if id_field and record.get(id_field) in (None, ""):
        raise RowError(f"missing id field {id_field!r} (from --map)")
    key = id_field or next((k for k in ("id", "prompt_id") if record.get(k) not in (None, "")), None)
    return msgs, None if key is None else str(record[key])


def default_prompts_path() -> Path:
    return Path(str(resources.files("moaa.pipeline.prompts") / "default.jsonl"))


class PromptStream:
    """The valid rows of a prompt source, read and checked one at a time: iterating holds one row, and
    per row only its id's 16-byte digest (for duplicates). Iterate once. After the last row, `skipped`
    holds the first KEPT_INVALID invalid rows (line, reason) and `invalid` counts them all; unless
    `skip_invalid`, the end of the iteration raises UserError naming the bad lines instead."""

    def __init__(self, path: str | Path | None = None, *, mapping: dict[str, str] | None = None,
                 skip_invalid: bool = False, split: str | None = None, limit: int | None = None,
                 keep_ids: bool = False):
        self.path = Path(path) if path else default_prompts_path()
        self.mapping, self.skip_invalid, self.split, self.limit, self.keep_ids = (
            mapping or {}, skip_invalid, split, limit, keep_ids)
        self.skipped: list[tuple[int, str]] = []
        self.invalid = self.count = 0

    def _rows(self) -> Iterator[tuple[int, PromptRow | RowError]]:
        for lineno, rec in records(self.path, "prompt", split=self.split):
            try:
                if isinstance(rec, json.JSONDecodeError):
                    raise RowError(f"not valid JSON ({rec.msg} at column {rec.colno})")
                msgs, source_id = row_to_prompt(rec, self.mapping)
                row = PromptRow(row_id(msgs, source_id, self.mapping, self.keep_ids), msgs, lineno, source_id)
            except RowError as err:
                row = err
            yield lineno, row

    def __iter__(self) -> Iterator[PromptRow]:
        seen, dups = IdSet(), {}   # dups: id -> its entries in `skipped`, to name the line of its first row
        for lineno, row in self._rows():
            if isinstance(row, PromptRow) and row.id in seen:
                if len(self.skipped) < KEPT_INVALID:
                    dups.setdefault(row.id, []).append(len(self.skipped))
                row = RowError(f"duplicate id {row.id}")
            if isinstance(row, RowError):
                self.invalid += 1
                if len(self.skipped) < KEPT_INVALID:
                    self.skipped.append((lineno, str(row)))
                continue
            seen.add(row.id)
            self.count += 1
            yield row
            if self.limit is not None and self.count >= self.limit:
                break
        self._name_first_lines(dups)
        if self.invalid and not self.skip_invalid:
            listed = "; ".join(f"line {ln}: {why}" for ln, why in self.skipped[:MAX_LISTED])
            more = f"; and {self.invalid - MAX_LISTED} more" if self.invalid > MAX_LISTED else ""
            raise UserError(f"{self.path}: {self.invalid} invalid row(s): {listed}{more} "
                            "(fix them, or pass --skip-invalid to skip them)")
        if not self.count:
            raise UserError(f"{self.path}: no usable prompts"
                            + (f" ({self.invalid} invalid rows skipped)" if self.invalid else ""))

    def _name_first_lines(self, dups: dict[str, list[int]]) -> None:
        """One more pass, only when duplicates are listed: the line each listed id was first seen on."""
        for lineno, row in self._rows() if dups else ():
            if isinstance(row, PromptRow) and row.id in dups:
                for i in dups.pop(row.id):
                    self.skipped[i] = (self.skipped[i][0], f"{self.skipped[i][1]} (same as line {lineno})")
                if not dups:
                    break

    def summary(self) -> str:
        if not self.invalid:
            return "no rows skipped"
        listed = ", ".join(f"line {ln} ({why})" for ln, why in self.skipped)
        more = f", and {self.invalid - len(self.skipped)} more" if self.invalid > len(self.skipped) else ""
        return f"skipped {self.invalid} invalid row(s): {listed}{more}"

