"""One writer per output: an OS lock (flock) on `<out>/.moaa-run.lock` for `moaa pipeline run`'s run folder,
on `<out>.lock` for the files `moaa annotate` and `moaa sample` append to (`output_lock`).

Two runs appending to one output would write the same ids twice. The kernel drops a flock when its
holder dies, SIGKILL included, so a lock left by a killed run is simply taken over; the file names the
holder (pid, host, start time) so that a refused run can say who holds the folder. The descriptor is
not inherited by children (Python opens files close-on-exec), so a stray child never keeps the lock.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from moaa.errors import UserError

LOCK_NAME = ".moaa-run.lock"


def _holder(fd: int, tries: int = 20) -> dict:
    """The holder's record; it is written just after the lock is taken, so wait briefly for it."""
    for _ in range(tries):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            return json.loads(raw)
        except ValueError:
            time.sleep(0.05)
    return {}


class RunLock:
    """The lock of a run folder (`root`), or of what `path` names (then `what` says what it is, for errors)."""

    def __init__(self, root: Path | None = None, *, path: Path | None = None, what: str = "",
                 command: str = "moaa pipeline run"):
        self.path = Path(path) if path is not None else Path(root) / LOCK_NAME
        self.what = what or f"run folder {self.path.parent}"
        self.command = command
        self.fd: int | None = None
        self.previous: dict = {}  # the record of a run that died holding the folder, if any

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK on a filesystem without locks
                os.close(fd)
                print(f"moaa: warning: cannot lock {self.path} ({err.strerror}); make sure no other run "
                      f"uses {self.what}", file=sys.stderr, flush=True)
                return self
            h = _holder(fd)
            os.close(fd)
            who = f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
            raise UserError(f"{self.what} is in use by another {self.command} ({who}); "
                            "wait for it to finish, stop it, or use another --out") from None
        self.previous = _holder(fd, tries=1)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a finished run leaves no holder behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def output_lock(out: Path, command: str) -> RunLock:
    """The lock of an output file that a command appends rows to, resumably: `<out>.lock` beside it."""
    out = Path(out)
    return RunLock(path=out.with_name(out.name + ".lock"), what=f"--out {out}", command=command)
