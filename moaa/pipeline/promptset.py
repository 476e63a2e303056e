"""The run's prompt set, kept on disk: checked once into `<run>/prompts.jsonl`, then streamed by each stage.

Held in memory, 65,000 prompts cost ~40 MB (0.6 KB a row) though a stage needs one row at a time. What
stays in memory per prompt here is the 16-byte digest of each eval prompt's id.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from moaa.files import atomic_write_text
from moaa.idset import IdSet
from moaa.jsonl import read_rows
from moaa.prompts import PromptRow, PromptStream, held_out_ids

QUICK_PROMPTS = 12


@dataclass
class RunPrompts:
    path: Path              # one {"id", "messages", "line"[, "source_id"]} per valid prompt, in input order
    count: int
    eval_ids: IdSet         # the held-out share: answered in stage 1, never trained on, the eval's prompts
    invalid: int = 0        # invalid input rows skipped (--skip-invalid)
    summary: str = "no rows skipped"

    @property
    def n_eval(self) -> int:
        return len(self.eval_ids)

    @property
    def n_train(self) -> int:
        return self.count - self.n_eval

    def rows(self, split: str | None = None) -> Iterator[PromptRow]:
        """Every prompt, or those of split "train" or "eval", read afresh from the file."""
        for rec in read_rows(self.path):
            if split is None or (split == "eval") == (rec["id"] in self.eval_ids):
                yield PromptRow(rec["id"], rec["messages"], rec["line"], rec.get("source_id"))


def _line(row: PromptRow) -> str:
    return json.dumps({**row.to_json(), "line": row.line}, ensure_ascii=False) + "\n"


def prepare_prompts(out: Path, stream: PromptStream, *, eval_fraction: float, quick: bool) -> RunPrompts:
    """Check the input row by row into `out` (written atomically: a bad input leaves no file); --quick keeps
    QUICK_PROMPTS spread over the file (the bundled set is grouped by topic); then the stable eval split."""
    atomic_write_text(out, (_line(r) for r in stream))
    count = stream.count
    if quick and count > QUICK_PROMPTS:
        step = count / QUICK_PROMPTS
        keep = {int(i * step) for i in range(QUICK_PROMPTS)}
        with out.open(encoding="utf-8") as fh:   # the rename leaves this open file readable
            atomic_write_text(out, (line for i, line in enumerate(fh) if i in keep))
        count = QUICK_PROMPTS
    ids = (rec["id"] for rec in read_rows(out))
    held = IdSet(held_out_ids(ids, eval_fraction, "eval", count=count))
    return RunPrompts(out, count, held, stream.invalid, stream.summary())


def config_hash(doc: dict[str, Any], prompt_ids: Iterable[str]) -> str:
    """sha256[:16] of `json.dumps({**doc, "prompts": [ids...]}, sort_keys=True)`, with the ids streamed in."""
    mark = "\x00prompt ids\x00"
    head, tail = json.dumps({**doc, "prompts": mark}, sort_keys=True).split(json.dumps(mark))
    h = hashlib.sha256(head.encode() + b"[")
    for i, rid in enumerate(prompt_ids):
        h.update(((", " if i else "") + json.dumps(rid)).encode())
    h.update(("]" + tail).encode())
    return h.hexdigest()[:16]
