"""Child processes that die with their parent, their own children included.

    proc = await spawn_tied([sys.executable, "-m", "vllm...", ...], stdout=log, ...)
    ...                      # stop: signal proc (forwarded to the command), killpg(proc.pid) for the rest
    release(proc)            # after the group is gone

`spawn_tied` starts `python -m moaa.services.local.lifeline FD -- COMMAND...`: a small stdlib-only
supervisor that leads a new process group and runs COMMAND in it. The parent holds the only write end
of a pipe whose read end is FD; when the parent goes, however it goes (kill -9 included), the
supervisor reads EOF and ends the whole group: SIGTERM, then SIGKILL after a grace period. vLLM's API
server and the engine-core processes it spawns are all in that group, so none is left as an orphan.

A pipe rather than PR_SET_PDEATHSIG alone: the death signal follows the *thread* that forked the child,
not the process, and it reaches only that one child, not the processes it starts. PR_SET_PDEATHSIG is
still set on COMMAND (its parent is the supervisor) so that a supervisor killed by the OOM killer takes
its command along.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

# after the parent is gone: SIGTERM, this long to exit, then SIGKILL (the environment variable is for tests)
GRACE_S = float(os.environ.get("MOAA_LIFELINE_GRACE_S", "10"))
_PR_SET_PDEATHSIG = 1
_held: dict[int, int] = {}  # supervisor pid -> the write end this process keeps open for it


def process_group_alive(pgid: int, exclude: tuple[int, ...] = ()) -> bool:
    """Whether any live (non-zombie) process is left in group pgid. Zombies count as gone: this
    machine's init may never reap the engine's orphaned workers, and they hold no resources."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 is the best we have
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid and int(stat.parent.name) not in exclude:
            return True  # fields: state, ppid, pgrp
    return False


async def spawn_tied(argv: list[str], **kwargs):
    """An asyncio subprocess running `argv` under the supervisor (its pid leads the group). Keyword
    arguments go to create_subprocess_exec (stdout, env, cwd...)."""
    import asyncio

    r, w = os.pipe()  # both ends non-inheritable: no other child of ours can hold the write end
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "moaa.services.local.lifeline", str(r), "--", *argv,
            pass_fds=(r,), start_new_session=True, **kwargs)
    except BaseException:
        os.close(w)
        raise
    finally:
        os.close(r)
    _held[proc.pid] = w
    return proc


def release(proc) -> None:
    """Let go of a supervisor whose group has ended (closing the pipe would end a live one)."""
    w = _held.pop(proc.pid, None)
    if w is not None:
        os.close(w)


# -- the supervisor ---------------------------------------------------------------------------------
def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL when its parent dies (PR_SET_PDEATHSIG)."""
    try:  # ctypes is imported at the top: no import between fork and exec (a threaded parent may hold the lock)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pipe still covers the parent's death
        pass


def _end_group(child: subprocess.Popen) -> None:
    """The parent is gone: SIGTERM the group, give it GRACE_S, then SIGKILL what is left (us included)."""
    me, pgid = os.getpid(), os.getpgid(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and process_group_alive(pgid, exclude=(me,)):
        child.poll()  # reap the command so that it does not count as alive
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m moaa.services.local.lifeline FD -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    fd = int(argv[0])
    child = subprocess.Popen(argv[2:], preexec_fn=die_with_parent)  # same group: ours

    def forward(sig, _frame):  # the parent stops the command by signalling us
        if child.poll() is None:
            child.send_signal(sig)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while child.poll() is None:
        try:
            ready, _, _ = select.select([fd], [], [], 0.2)
        except InterruptedError:  # a forwarded signal
            continue
        if ready and not os.read(fd, 1):  # EOF: the parent is gone
            _end_group(child)
    code = child.returncode
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
