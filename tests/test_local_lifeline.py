"""Processes started by moaa die with it, their own children included, even when moaa is killed with
SIGKILL (services/local/lifeline.py). Real processes; psutil checks what is left."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.fixtures.kill import alive, wait_all_gone

# A stand-in for vLLM: the server process starts an "engine core" child and a worker that ignores
# SIGTERM (only SIGKILL ends it), then serves forever.
STANDIN = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
time.sleep(300)
"""

PARENT = """
import asyncio, sys
from moaa.services.local.lifeline import spawn_tied

async def main():
    proc = await spawn_tied([sys.executable, "-c", sys.argv[1]])
    print(proc.pid, flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def descendants(pid: int, at_least: int, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        procs = psutil.Process(pid).children(recursive=True)
        if len(procs) >= at_least or time.monotonic() > deadline:
            return procs
        time.sleep(0.1)


def kill_all(procs: list[psutil.Process]) -> None:
    for p in alive(procs):
        p.kill()


def test_sigkilled_parent_takes_the_whole_tree_along():
    env = {**os.environ, "MOAA_LIFELINE_GRACE_S": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, STANDIN], stdout=subprocess.PIPE, env=env)
    tree: list[psutil.Process] = []
    try:
        supervisor = int(parent.stdout.readline())
        tree = descendants(parent.pid, at_least=4)  # supervisor, server, engine core, stubborn worker
        assert len(tree) == 4 and supervisor in {p.pid for p in tree}
        assert {os.getpgid(p.pid) for p in tree} == {supervisor}  # one group, led by the supervisor
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        left = wait_all_gone(tree, timeout=8.0)  # SIGTERM, 1 s grace, SIGKILL for the stubborn one
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        parent.kill()
        kill_all(tree)


def test_supervisor_forwards_signals_and_exit_codes(tmp_path):
    import asyncio

    from moaa.services.local.lifeline import process_group_alive, release, spawn_tied

    async def main():
        proc = await spawn_tied([sys.executable, "-c", "import sys; sys.exit(7)"])
        assert await proc.wait() == 7
        release(proc)
        proc = await spawn_tied([sys.executable, "-c", "import time; time.sleep(300)"])
        await asyncio.sleep(0.5)
        proc.terminate()  # to the supervisor, which passes it on
        assert await asyncio.wait_for(proc.wait(), 10) == 128 + signal.SIGTERM
        for _ in range(50):
            if not process_group_alive(proc.pid):
                break
            await asyncio.sleep(0.1)
        assert not process_group_alive(proc.pid)
        release(proc)

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
def test_sigkilled_backend_serve_leaves_no_engine(tiny_model_dir, engine):
    """`moaa backend serve` killed with -9: its engine (and vLLM's engine core) is gone a few seconds later."""
    from moaa.engines import vllm_available

    if engine == "vllm" and not vllm_available():
        pytest.skip("vllm is not installed here")
    proc = subprocess.Popen([sys.executable, "-m", "moaa.cli.main", "backend", "serve", "--model", str(tiny_model_dir),
                             "--engine", engine, "--port", "0", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        line = proc.stdout.readline().decode()
        assert re.search(r"serving 'tiny' at http://127\.0\.0\.1:\d+/v1", line), line
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert len(tree) >= 2  # the supervisor and the engine
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        left = wait_all_gone(tree, timeout=15.0)
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        proc.kill()
        kill_all(tree)


def test_supervisor_usage_error_exits_2():
    proc = subprocess.run([sys.executable, "-m", "moaa.services.local.lifeline", "3"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and proc.stderr.startswith("usage: python -m moaa.services.local.lifeline FD --")
