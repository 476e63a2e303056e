"""One `moaa pipeline run` per run folder: an OS lock (flock) on `<out>/.moaa-run.lock`.

Two runs appending to one folder would write the same ids twice. The kernel drops a flock when its
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
    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_NAME
        self.fd: int | None = None
        self.previous: dict = {}  # the record of a run that died holding the folder, if any

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK on a filesystem without locks
                os.close(fd)
                print(f"moaa pipeline: warning: cannot lock {self.path} ({err.strerror}); make sure no other run "
                      "uses this folder", file=sys.stderr, flush=True)
                return self
            h = _holder(fd)
            os.close(fd)
            who = f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
            raise UserError(f"run folder {self.path.parent} is in use by another moaa pipeline run ({who}); "
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
