"""The one resumable JSONL writer and reader, for every file of rows keyed by "id" that moaa appends to
(the pipeline's dataset folders, `moaa sample`, `moaa annotate`).

Rules, in one place:
- a row is one JSON object with "id" as its first key, written as `line + newline` with ONE `write` to a
  file opened for append, then fsynced; a short write is an error, never a half line left in the middle;
- the torn-tail rule: bytes after the last newline are the torn write of a killed run, cut off when the
  file is opened for appending, so that row is simply done again;
- any other line that is not a JSON object with an "id" is an error naming file:line, never a silent
  truncation: a complete line was written whole, so garbage there is not ours to repair;
- a file whose first line is not one of our rows is refused (a wrong `--out` must not be truncated).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from moaa.errors import TransientError, UserError

ID_KEY = "id"


def _foreign(path: Path, why: str) -> UserError:
    return UserError(f"{path} is not a moaa JSONL file of rows keyed by {ID_KEY!r} ({why}); "
                     "give another output path or remove that file")


def _looks_ours(head: bytes) -> bool:
    """A torn first line can only be ours if it starts as our writer starts every line."""
    return head.lstrip().startswith(b'{"id"')


def iter_scan(path: str | Path, *, repair: bool = False, key: str | None = ID_KEY) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every complete row, read line by line: memory stays one line, however long
    the file (a 65,000-row samples file is one shard). With `repair`, a torn tail is cut off the file once
    every row was read. Raises UserError for a foreign file or a bad line before the tail. `key=None`
    reads logs whose rows carry no id (training metrics)."""
    path = Path(path)
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    rows, end, tail = 0, 0, b""
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                tail = line  # only the last line can lack its newline
                break
            end += len(line)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                if not rows:
                    raise _foreign(path, f"line {n} is not JSON") from None
                raise UserError(f"{path}:{n}: not JSON ({getattr(err, 'msg', err)}); only the last line of a "
                                "killed run can be torn: fix or remove this line") from None
            if not isinstance(row, dict) or (key is not None and key not in row):
                if not rows:
                    raise _foreign(path, f"line {n} has no {key!r}" if isinstance(row, dict) else f"line {n} is not an object")
                raise UserError(f"{path}:{n}: not a row with {key!r}; fix or remove this line")
            rows += 1
            yield n, row
    if key is not None and tail.strip() and not rows and not _looks_ours(tail):
        raise _foreign(path, "it does not start with a row")
    if tail and repair:
        with path.open("rb+") as fh:
            fh.truncate(end)


def read_rows(path: str | Path, *, key: str | None = ID_KEY) -> Iterator[dict]:
    """The complete rows of a file, one at a time (a torn tail is ignored, not cut)."""
    return (row for _, row in iter_scan(path, key=key))


def open_bytes(path: Path):
    """A file written by anyone, opened for reading bytes: gzip'd when its name ends in .gz."""
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; give a file") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None


_READ_ERRORS = (OSError, EOFError)   # what reading a truncated or corrupt .gz raises


def _unreadable(path: Path, err: BaseException) -> UserError:
    return UserError(f"cannot read {path}: {err}")


def read_bytes(path: Path, size: int = -1) -> bytes:
    """The first `size` bytes (all with -1) of a file opened as `open_bytes` opens it, errors as one line."""
    with open_bytes(path) as fh:
        try:
            return fh.read(size)
        except _READ_ERRORS as err:
            raise _unreadable(path, err) from None


def iter_lines(path: Path, *, blanks: bool = False, stream=None) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON or its JSONDecodeError) for every non-blank line of a UTF-8 file (gzip'd
    if named .gz; a byte-order mark, as Windows tools write, is skipped). `blanks`: (n, None) for blank lines.
    `stream`: an open binary stream read instead of the file (`path` then only names it in errors)."""
    offset = 0
    with open_bytes(path) if stream is None else contextlib.nullcontext(stream) as fh:
        try:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {offset + err.start})") from None
                offset += len(raw)
                if n == 1:
                    line = line.removeprefix("\ufeff")
                if line.strip():
                    try:
                        yield n, json.loads(line)
                    except json.JSONDecodeError as err:
                        yield n, err
                elif blanks:
                    yield n, None
        except _READ_ERRORS as err:
            raise _unreadable(path, err) from None


STDIN = "-"


def read_input(path: str | Path, what: str, *, stdin: bool = False) -> list[tuple[int, dict]]:
    """(line number, row) of an input file written by anyone (samples, labelled pairs, answers): every
    non-blank line must be a JSON object; the first that is not stops with file:line. `stdin`: "-" reads
    standard input, for callers that read their input once (a second read would find it empty)."""
    return list(iter_input(path, what, stream=sys.stdin.buffer if stdin and str(path) == STDIN else None))


def iter_input(path: str | Path, what: str, *, stream=None) -> Iterator[tuple[int, dict]]:
    """`read_input`, one row at a time (memory stays one row); `stream`: an open binary stream read instead
    of the file (`path` then only names it in errors)."""
    path = Path(path)
    if stream is None and not path.exists():
        raise UserError(f"{what} file {path} does not exist")
    for n, row in iter_lines(path, stream=stream):
        if isinstance(row, json.JSONDecodeError):
            raise UserError(f"{path}:{n}: not JSON ({row.msg})")
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object per line")
        yield n, row


def encode(row: dict) -> bytes:
    if ID_KEY not in row:
        raise ValueError(f"a row needs {ID_KEY!r}")
    ordered = {ID_KEY: row[ID_KEY], **row}  # "id" first: how a torn first line is recognised as ours
    return (json.dumps(ordered, ensure_ascii=False) + "\n").encode("utf-8")


class JsonlAppender:
    """Append-only, fsynced writer of one file. `open()` cuts a torn tail and returns the rows already there.
    Each append opens, writes, fsyncs and closes: nothing to close, and no descriptor outlives a row.

    `sync_every_s` > 0 is group commit: every row is written at once (a killed process loses nothing it
    wrote: the kernel has it), but fsynced at most that often and at `sync()`. An fsync costs 3-5 ms on
    a loaded disk, on the writer's event loop: per row it capped a 65,000-row stage near 200 rows/s
    (benchmarks/pipeline_scale.py). Only a machine crash can then lose the rows of the last interval;
    they are not in the file, so a resume does them again (a torn last line is cut as always)."""

    def __init__(self, path: str | Path, *, sync_every_s: float = 0.0):
        self.path = Path(path)
        self.sync_every_s = sync_every_s
        self._broken = False
        self._unsynced = False
        self._synced_at = time.monotonic()

    def open(self) -> list[dict]:
        return list(self.open_iter())

    def open_iter(self) -> Iterator[dict]:
        """`open`, one row at a time (memory stays one row); the torn tail is cut once all are read."""
        for _, row in iter_scan(self.path, repair=True):
            yield row
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        if self._broken:  # a short write left a partial line: appending after it would bury it mid-file
            raise TransientError(f"{self.path}: an earlier write was short; rerun to resume")
        data = encode(row)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):
                self._broken = True  # the partial line is the file's tail: the next open cuts it
                raise TransientError(f"short write to {self.path} ({written} of {len(data)} bytes; disk full?)")
            now = time.monotonic()
            if now - self._synced_at >= self.sync_every_s:
                os.fsync(fd)
                self._synced_at, self._unsynced = now, False
            else:
                self._unsynced = True
        finally:
            os.close(fd)

    def sync(self) -> None:
        """fsync what group commit left unsynced (an fsync of any descriptor flushes the whole file)."""
        if not self._unsynced:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._synced_at, self._unsynced = time.monotonic(), False
