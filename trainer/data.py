"""Loading and checking training data before any step runs.

Rows must be in TRL's conversational formats (SFT: `messages`, or `prompt` + `completion`, whose loss TRL
computes on the completion only; DPO: preference rows, explicit or implicit prompt); TRL applies the chat
template itself. Pre-templated strings are refused: they are how double BOS tokens and misplaced assistant
headers get into training data (TRL #1541, alignment-handbook #116). Every problem stops the run naming the rows; every row
dropped on purpose (exact duplicates, over-long rows when asked) is counted and reported.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moaa.errors import UserError
from moaa.prompts import RowError, message_text
from moaa.records import records, row_unit

ROLES = ("system", "user", "assistant")
MAX_LISTED = 8  # problems named in the one-line error; the count says how many more
# TRL's standard (non-conversational) format would train on the raw strings with no chat template; moaa trains
# chat models, so it asks for the conversational form rather than guess which turn a string is.
STRING_ROW = ("a string (TRL's standard format, or pre-templated text); moaa trains on TRL's conversational "
              "format: give a list of {\"role\", \"content\"} messages and let the chat template format it")


@dataclass
class DataReport:
    path: str
    kind: str
    unit: str = "line"   # how rows are numbered in errors: JSON Lines by line, anything else by row
    format: str = ""   # SFT: "messages" or "prompt-completion" (one per file); DPO: "preference"
    rows_read: int = 0
    rows_kept: int = 0
    blank_lines: int = 0
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> row ids
    sha256: str = ""

    def drop(self, reason: str, row_id: str) -> None:
        self.dropped.setdefault(reason, []).append(row_id)

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "format": self.format, "rows_read": self.rows_read,
                "rows_kept": self.rows_kept, "blank_lines": self.blank_lines, "sha256": self.sha256,
                "dropped": {k: {"count": len(v), "ids": v[:50]} for k, v in self.dropped.items()}}


def file_sha256(path: str | Path) -> str:
    """The data's hash: a file's bytes, or for a saved datasets folder every file's name and bytes."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        if path.is_dir():
            h.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check_message(msg: Any, where: str) -> str | None:
    if not isinstance(msg, dict):
        if isinstance(msg, str):
            return f"{where} is a string; give a message object {{\"role\", \"content\"}}"
        return f"{where} is not a message object"
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        return f"{where} has role {role!r}; use one of {', '.join(ROLES)}"
    if not isinstance(content, str):
        return f"{where} content must be a string or a list of text parts"
    if not content.strip():
        return f"{where} ({role}) is empty"
    return None


MESSAGE_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


def join_text_parts(row: dict) -> str | None:
    """OpenAI's content parts (`[{"type": "text", "text": ...}]`, as chat logs and OpenAI-format datasets hold
    them) become the one string a text model's chat template renders; a template given the list would print
    its Python text. Parts are joined by newlines, as for prompts (`moaa.prompts.message_text`). Returns the
    problem (a non-text part), or None."""
    for name in MESSAGE_FIELDS:
        msgs = row.get(name)
        if not isinstance(msgs, list):
            continue
        for i, m in enumerate(msgs):
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                try:
                    msgs[i] = {**m, "content": message_text(m["content"], f"{name}[{i}]")}
                except RowError as e:
                    return str(e)
    return None


def _check_conversation(msgs: Any, name: str, *, must_end: str) -> str | None:
    """Roles: optional system first, then user/assistant alternating from user, ending in `must_end`."""
    if isinstance(msgs, str):
        return f"{name} is {STRING_ROW}"
    if not isinstance(msgs, list) or not msgs:
        return f"{name} must be a non-empty list of messages"
    for i, m in enumerate(msgs):
        problem = _check_message(m, f"{name}[{i}]")
        if problem:
            return problem
    turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
    if not turns:
        return f"{name} holds only a system message"
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            idx = i + (len(msgs) - len(turns))
            return f"{name}[{idx}] is {m['role']!r} where {expected!r} is expected (turns must alternate, user first)"
    if turns[-1]["role"] != must_end:
        return f"{name} must end with a {must_end} message"
    return None


SFT_FORMATS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion")}


def sft_format(row: dict) -> str:
    """TRL's conversational SFT formats: `messages`, or `prompt` + `completion` (TRL then computes the loss
    on the completion only, its `completion_only_loss` default)."""
    return "prompt-completion" if "messages" not in row and "completion" in row else "messages"


def check_sft_row(row: dict) -> str | None:
    if "messages" not in row:
        if "chosen" in row or "rejected" in row:
            return "a preference row where an SFT row {\"messages\": [...]} is expected (use moaa train dpo?)"
        if "completion" in row:
            return _check_prompt_completion(row)
        if "text" in row or "prompt" in row:
            return "pre-templated text; give {\"messages\": [...]} and let the chat template format it"
        return "missing field 'messages'"
    return _check_conversation(row["messages"], "messages", must_end="assistant")


def _check_prompt_completion(row: dict) -> str | None:
    """A conversational prompt (ending with the user's turn) and the turns that answer it (from the assistant's,
    ending with one): together one conversation."""
    if "prompt" not in row:
        return "a completion without a prompt; prompt-completion rows are {prompt: [messages], completion: [messages]}"
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) or isinstance(completion, str):
        return f"{'prompt' if isinstance(prompt, str) else 'completion'} is {STRING_ROW}"
    if not isinstance(completion, list) or not completion:
        return "completion must be a non-empty list of messages"
    return (_check_conversation(prompt, "prompt", must_end="user")
            or _check_conversation(prompt + completion, "prompt + completion", must_end="assistant"))


def _answer(msgs: Any, name: str) -> str | None:
    if isinstance(msgs, str):
        return f"{name} is {STRING_ROW}"
    if not isinstance(msgs, list) or len(msgs) != 1:
        return f"{name} must be a list holding exactly one assistant message"
    problem = _check_message(msgs[0], f"{name}[0]")
    if problem:
        return problem
    if msgs[0]["role"] != "assistant":
        return f"{name}[0] has role {msgs[0]['role']!r}; it must be 'assistant'"
    return None


def implicit_prompt(row: dict) -> dict:
    """TRL's implicit prompt (`trl.maybe_extract_prompt`): conversational chosen/rejected that both start with
    the prompt (trl-lib/ultrafeedback_binarized; HuggingFaceH4's, whose `prompt` is a string) are split at
    their first differing message into prompt, chosen and rejected, as TRL does."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(row.get("prompt"), list) or not (isinstance(chosen, list) and isinstance(rejected, list)
                                                   and chosen and isinstance(chosen[0], dict)):
        return row
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:   # nothing shared: no prompt to take (a string prompt stays, and is refused as one)
        return row
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def check_pref_row(row: dict) -> str | None:
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing and "messages" in row:
        return "an SFT row {messages} where a preference row {prompt, chosen, rejected} is expected"
    if missing:
        return f"missing field(s) {', '.join(missing)}; preference rows are {{prompt, chosen, rejected}}"
    problem = (_check_conversation(row["prompt"], "prompt", must_end="user")
               or _answer(row["chosen"], "chosen") or _answer(row["rejected"], "rejected"))
    if problem:
        return problem
    if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
        return "chosen equals rejected (no preference to learn)"
    return None


def _content_key(row: dict, kind: str) -> str:
    return json.dumps([row[k] for k in row_fields(row, kind)], sort_keys=True, ensure_ascii=False)


def row_length(row: dict, kind: str, tokenizer) -> int:
    """Tokens of the longest templated sequence this row becomes."""
    def n(msgs):
        ids = tokenizer.apply_chat_template(msgs, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # BatchEncoding in transformers 5
        return len(ids)
    if kind == "sft":
        return n(row["messages"] if "messages" in row else row["prompt"] + row["completion"])
    return max(n(row["prompt"] + row["chosen"]), n(row["prompt"] + row["rejected"]))


def _fail(path: Path, problems: list[tuple[str, str]], hint: str = "") -> None:
    """One line: problems grouped by what is wrong, each naming its rows (line number and id)."""
    groups: dict[str, list[str]] = {}
    for label, text in problems:
        groups.setdefault(text, []).append(label)
    parts = []
    for text, labels in groups.items():
        shown = ", ".join(labels[:MAX_LISTED]) + (f" and {len(labels) - MAX_LISTED} more" if len(labels) > MAX_LISTED else "")
        parts.append(f"{shown}: {text}")
    raise UserError(f"{path}: {len(problems)} bad row(s): " + "; ".join(parts) + (f" ({hint})" if hint else ""))


def load_rows(path: str | Path, kind: str, *, drop_duplicates: bool = True) -> tuple[list[dict], DataReport]:
    """Read and check a data file's rows (JSON Lines, Parquet, a saved datasets folder: `moaa/records.py`).
    Raises UserError naming every bad row (line or row number, and id)."""
    path = Path(path)
    unit = row_unit(path)
    check: Callable[[dict], str | None] = check_sft_row if kind == "sft" else check_pref_row
    report = DataReport(str(path), kind, unit)
    problems: list[tuple[str, str]] = []
    kept: list[dict] = []
    seen_ids: dict[str, int] = {}
    seen_content: dict[str, str] = {}
    first_line = 0   # where the file's format was set by its first good row
    for lineno, row in records(path, "data", blanks=True):   # the one reader of users' data files
        if row is None:
            report.blank_lines += 1
            continue
        report.rows_read += 1
        if isinstance(row, json.JSONDecodeError):
            problems.append((f"{unit} {lineno}", f"not JSON ({row.msg} at column {row.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append((f"{unit} {lineno}", "not a JSON object"))
            continue
        parts_problem = join_text_parts(row)
        if kind != "sft":
            row = implicit_prompt(row)
        has_id = row.get("id") is not None   # a Parquet or datasets id column may hold nulls
        rid = str(row["id"]) if has_id else f"{unit}-{lineno}"
        label = f"{unit} {lineno} (id {rid})" if has_id else f"{unit} {lineno}"
        problem = parts_problem or check(row)
        if problem:
            problems.append((label, problem))
            continue
        fmt = sft_format(row) if kind == "sft" else "preference"
        if not report.format:
            report.format, first_line = fmt, lineno
        elif fmt != report.format:   # TRL tokenizes a dataset one way: a file holds one format
            problems.append((label, f"a {fmt} row in a file of {report.format} rows ({unit} {first_line}); "
                                    "TRL trains one format per file"))
            continue
        if rid in seen_ids:
            problems.append((label, f"duplicate id, first on {unit} {seen_ids[rid]}"))
            continue
        seen_ids[rid] = lineno
        key = _content_key(row, kind)
        if key in seen_content:
            if drop_duplicates:
                report.drop(f"duplicate of {seen_content[key]}", rid)
                continue
            problems.append((label, f"same content as {seen_content[key]}"))
            continue
        seen_content[key] = rid
        kept.append({"id": rid, "line": lineno, **{k: row[k] for k in row_fields(row, kind)}})
    if problems:
        _fail(path, problems)
    report.sha256 = file_sha256(path)
    report.rows_kept = len(kept)
    _check_not_empty(path, kept, report)
    return kept, report


def load_data(data: str, eval_data: str | None, kind: str, *, drop_duplicates: bool = True,
              present_only: bool = False) -> tuple[list[dict], DataReport, list[dict] | None, DataReport | None]:
    """The training rows and (with eval_data) the held-out rows, each file checked, both in one format (the
    trainer formats and masks both alike). present_only: check only the files that are on this machine."""
    def load(path):
        if path and not (present_only and not Path(path).exists()):
            return load_rows(path, kind, drop_duplicates=drop_duplicates)
        return None, None
    rows, report = load(data)
    eval_rows, eval_report = load(eval_data)
    if report and eval_report and report.format != eval_report.format:
        raise UserError(f"{eval_data} holds {eval_report.format} rows and {data} {report.format} rows; "
                        "give the eval data in the training data's format")
    return rows, report, eval_rows, eval_report


def _check_not_empty(path, kept, report) -> None:
    if not kept:
        raise UserError(f"{path}: no usable rows (read {report.rows_read}, dropped "
                        f"{sum(len(v) for v in report.dropped.values())})")


def check_lengths(rows: list[dict], report: DataReport, tokenizer, max_length: int,
                  drop_overlong: bool = False) -> list[dict]:
    """Over-long rows stop the run (or are dropped and counted with drop_overlong)."""
    kept, problems = [], []
    for row in rows:
        length = row_length(row, report.kind, tokenizer)
        if length <= max_length:
            kept.append(row)
        elif drop_overlong:
            report.drop(f"longer than max_length {max_length}", row["id"])
        else:
            problems.append((f"{report.unit} {row['line']} (id {row['id']})",
                             f"{length} tokens > max_length {max_length}"))
    if problems:
        _fail(Path(report.path), problems, hint="raise max_length or set drop_overlong: true")
    report.rows_kept = len(kept)
    _check_not_empty(report.path, kept, report)
    return kept


def row_fields(row: dict, kind: str) -> tuple[str, ...]:
    """TRL's columns of a checked row."""
    return SFT_FORMATS[sft_format(row)] if kind == "sft" else ("prompt", "chosen", "rejected")


def to_dataset(rows: list[dict], kind: str):
    """Only TRL's columns go to the trainer; ids and line numbers stay in our report."""
    from datasets import Dataset

    return Dataset.from_list([{k: r[k] for k in row_fields(r, kind)} for r in rows])
