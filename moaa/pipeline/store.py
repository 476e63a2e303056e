"""Dataset folders: sharded JSONL rows in TRL's formats, keyed by row id, with a manifest.

Layout of one dataset folder:
    data-00000.jsonl ...   rows (one JSON object per line, each with its "id")
    skipped.jsonl          ids handled on purpose without a row (e.g. a pair the judges could not separate)
    failures.jsonl         ids that failed; retried on the next run (not "done")
    rejected.jsonl         ids the server refused as bad input (a prompt past the model's context): no retry
                           helps, so they are done and never resent; an edited prompt has a new id
    manifest.json          counts, models, config hash, stage, timestamps, complete flag

Exactly once: every line goes through the one resumable writer (`moaa.jsonl`: one write per row; a torn
last line of a killed run is cut by `open` and that row is done again). Ids already present in rows or
skipped.jsonl are never written twice. Rows are fsynced by group commit (every SYNC_EVERY_S, and before
each manifest): a killed process loses no row it wrote; a machine crash loses at most the last interval's
rows, which are then simply not done and are redone on resume.
The manifest is replaced atomically (write to a temporary file, fsync, rename).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from moaa.errors import UserError
from moaa.files import atomic_write_json, read_json, rejection, utc_now
from moaa.idset import IdSet
from moaa.jsonl import JsonlAppender, read_rows
from moaa.usage import add_usage, usage_tokens

SHARD_ROWS = 1000
SYNC_EVERY_S = 0.2   # group commit of the rows (moaa.jsonl.JsonlAppender); the manifest is written after a sync
FORMATS = ("sft", "preference", "samples", "generations")
REJECTED = "rejected.jsonl"
MAX_MESSAGES = 256   # distinct failure messages shared between failed rows


class DatasetStore:
    """Append-only, resumable writer and reader of one dataset folder."""

    def __init__(self, folder: str | Path, *, stage: str, fmt: str, config_hash: str | None = None,
                 shard_rows: int = SHARD_ROWS):
        if fmt not in FORMATS:
            raise ValueError(f"unknown dataset format {fmt!r}")
        self.folder = Path(folder)
        self.stage, self.fmt, self.config_hash, self.shard_rows = stage, fmt, config_hash, shard_rows
        # ids only, 16 bytes each (a 65,000-row folder reopens in ~1 MB); reasons only as counts
        self.done = IdSet()
        self.skipped = IdSet()
        self.skip_reasons: Counter[str] = Counter()
        self.failed: dict[str, str] = {}
        self._messages: dict[str, str] = {}   # one copy of each failure message (an outage fails rows alike)
        self.rejected = IdSet()
        self.rejected_reason = ""   # the first rejection's message: the summary names it
        self.rows = 0
        self.models: set[str] = set()
        self.extra: dict[str, Any] = {}
        self.usage: dict[str, dict[str, int]] = {}   # model -> tokens journaled in this folder's records
        self._writers: dict[Path, JsonlAppender] = {}
        self._shard_rows = 0
        self._shard_index = 0
        self.manifest: dict[str, Any] = {}

    # -- opening -------------------------------------------------------------------------------
    def open(self) -> "DatasetStore":
        self.folder.mkdir(parents=True, exist_ok=True)
        mpath = self.folder / "manifest.json"
        if mpath.exists():
            self.manifest = read_json(mpath)
            old = self.manifest.get("config_hash")
            if self.config_hash and old and old != self.config_hash:
                raise UserError(f"{self.folder} was written with another configuration (config hash {old}, "
                                f"now {self.config_hash}); use a new --out folder or delete this one")
            self.models = set(self.manifest.get("models", []))
            self.extra = dict(self.manifest.get("extra", {}))
        # one row at a time: what stays is the ids and the counts, never a shard's rows
        shards = self.shards()
        last = 0
        for shard in shards:
            last = 0
            for row in self._writer(shard).open_iter():
                self.done.add(row["id"])
                self._count(row)
                last += 1
            self.rows += last
        for rec in self._writer(self.folder / "skipped.jsonl").open_iter():
            self._skipped(rec["id"], rec.get("reason", ""))
            self._count(rec)
        for rec in self._writer(self.folder / "failures.jsonl").open_iter():
            self.failed[rec["id"]] = self._message(rec.get("error", ""))
            self._count(rec)
        for rec in self._writer(self.folder / REJECTED).open_iter():
            self._rejected(rec["id"], rec.get("reason", ""))
        for rid in list(self.failed):
            if self.is_done(rid):
                del self.failed[rid]
        if shards:
            self._shard_index = len(shards) - 1
            self._shard_rows = last
        if not self.manifest:
            self.manifest = {"created_at": utc_now()}
        return self

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("data-*.jsonl"))

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def is_done(self, row_id: str) -> bool:
        """Written as a row, skipped on purpose or rejected as bad input: never redone."""
        return row_id in self.done or row_id in self.skipped or row_id in self.rejected

    # -- writing -------------------------------------------------------------------------------
    def _writer(self, path: Path) -> JsonlAppender:
        if path not in self._writers:
            self._writers[path] = JsonlAppender(path, sync_every_s=SYNC_EVERY_S)
        return self._writers[path]

    def _append_line(self, path: Path, obj: dict) -> None:
        self._writer(path).append(obj)
        self._count(obj)

    def _count(self, rec: dict) -> None:
        """Sum the tokens journaled with a record ("usage": {model: {...}}): the ledger's source of truth."""
        for model, u in (rec.get("usage") or {}).items():
            add_usage(self.usage, model, *usage_tokens(u), u.get("requests", 0) or 0)

    def write(self, row: dict, *, models: list[str] | None = None) -> bool:
        """Append one row (must carry "id"). Returns False when that id is already done."""
        rid = row["id"]
        if self.is_done(rid):
            return False
        if self._shard_rows >= self.shard_rows:
            self._shard_index += 1
            self._shard_rows = 0
        self._append_line(self.folder / f"data-{self._shard_index:05d}.jsonl", row)
        self._shard_rows += 1
        self.rows += 1
        self.done.add(rid)
        self.failed.pop(rid, None)
        self.models.update(models or [])
        return True

    def skip(self, row_id: str, reason: str, **info: Any) -> bool:
        if self.is_done(row_id):
            return False
        self._append_line(self.folder / "skipped.jsonl", {"id": row_id, "reason": reason, **info})
        self._skipped(row_id, reason)
        self.failed.pop(row_id, None)
        return True

    def _skipped(self, row_id: str, reason: str) -> None:
        if row_id not in self.skipped:
            self.skipped.add(row_id)
            self.skip_reasons[reason.split(":")[0]] += 1

    def reject(self, row_id: str, reason: str) -> bool:
        """Record an item the server refused as bad input ("CODE: message"): done, never resent."""
        if self.is_done(row_id):
            return False
        self._append_line(self.folder / REJECTED, rejection(row_id, self.stage, reason))
        self._rejected(row_id, reason)
        self.failed.pop(row_id, None)
        return True

    def _rejected(self, row_id: str, reason: str) -> None:
        self.rejected.add(row_id)
        self.rejected_reason = self.rejected_reason or reason

    def fail(self, row_id: str, error: str, **info: Any) -> None:
        """Record a failure; the id stays pending and is retried on the next run."""
        self._append_line(self.folder / "failures.jsonl", {"id": row_id, "error": error, "at": utc_now(), **info})
        self.failed[row_id] = self._message(error)

    def _message(self, error: str) -> str:
        """The copy of `error` already held, if any: the failed rows of an outage share one message (the
        first MAX_MESSAGES distinct ones are shared; later ones are kept as they come)."""
        kept = self._messages.get(error)
        if kept is None:
            kept = error
            if len(self._messages) < MAX_MESSAGES:
                self._messages[error] = error
        return kept

    def sync(self) -> None:
        """fsync every row written so far (group commit leaves up to SYNC_EVERY_S of them unsynced)."""
        for w in self._writers.values():
            w.sync()

    def write_manifest(self, *, complete: bool = False, **extra: Any) -> dict:
        self.sync()  # the counts it records are on disk first
        self.extra.update(extra)
        self.manifest.update({
            "stage": self.stage,
            "format": self.fmt,
            "rows": self.rows,
            "skipped": len(self.skipped),
            "skipped_reasons": dict(self.skip_reasons),
            "failed": len(self.failed),
            "rejected": len(self.rejected),
            "rejected_reason": self.rejected_reason,
            "shards": [p.name for p in self.shards()],
            "models": sorted(self.models),
            "config_hash": self.config_hash or self.manifest.get("config_hash"),
            "updated_at": utc_now(),
            "complete": complete,
            "extra": self.extra,
        })
        if complete:
            self.manifest["completed_at"] = utc_now()
        atomic_write_json(self.folder / "manifest.json", self.manifest)
        return self.manifest

    # -- reading -------------------------------------------------------------------------------
    def iter_rows(self) -> Iterator[dict]:
        for shard in self.shards():
            yield from read_rows(shard)
