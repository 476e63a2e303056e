"""The one atomic file writer and JSON reader, for every command that writes a whole file (manifests,
summaries, reports, the run's prompt set) and for the folders the commands write into."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from moaa.errors import UserError


def atomic_write_text(path: Path, text: str | Iterable[str]) -> None:
    """Write `text` (a string, or its pieces one by one: a whole dataset never sits in memory) to a
    temporary file, fsync, rename: readers see the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)   # a generator that raises (bad input found late) leaves no file behind
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file of a run folder (a manifest, a summary); None while it is not written."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def check_folder(path: str | Path, flag: str = "--out") -> Path:
    """An output folder given by the user: a file in its place is bad input."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder (new, or one to resume)")
    return path


def make_folder(path: str | Path, flag: str = "--out") -> Path:
    """The output folder a command writes into, made if missing; a file in its place is bad input."""
    path = check_folder(path, flag)
    path.mkdir(parents=True, exist_ok=True)
    return path


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# said when every row was rejected: then the cause may be the server's configuration, not the rows
RESEND_HINT = "fix those rows; if the server's configuration was the cause, fix it and delete that file to resend them"


def rejected_note(result: dict[str, Any]) -> str:
    """'; N prompts rejected: <reason>; see <file>' for a result with rejections (the pipeline's summary and
    report.md, `moaa annotate`'s counts line)."""
    n = result.get("rejected") or 0
    return f"; {n} prompts rejected: {result['rejected_reason']}; see {result['rejected_file']}" if n else ""


def rejection(row_id: str, stage: str, reason: str, **settings: str) -> dict:
    """The one record of a rejected item (the pipeline's rejected.jsonl, `moaa annotate`'s <out>.rejected.jsonl),
    with the run's settings it was rejected under, if they can change (`moaa annotate --ensemble/--mode`)."""
    return {"id": row_id, "stage": stage, "reason": reason, "at": utc_now(), **settings}
