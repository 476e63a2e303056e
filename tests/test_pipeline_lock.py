"""The output lock (moaa/lock.py) with real processes: a run folder's (its CLI side is in test_pipeline_run.py),
and the files `moaa annotate` and `moaa sample` append to."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from moaa.errors import UserError
from moaa.lock import RunLock
from tests.fixtures.cli import run_moaa

HOLD = "import sys, time; from moaa.lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(120)"


def test_a_held_folder_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another moaa pipeline run \(pid {proc.pid} on host "
                                            rf"{socket.gethostname()}, started "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()                    # SIGKILL: no clean-up runs, the kernel drops the flock
        proc.wait()
    lock = RunLock(tmp_path).acquire()
    assert lock.previous["pid"] == proc.pid               # the dead run is named, then replaced
    lock.release()
    with RunLock(tmp_path) as again:
        assert again.previous == {}                        # a released lock names nobody


HOLD_OUT = "import sys, time; from pathlib import Path; from moaa.lock import output_lock; " \
           "output_lock(Path(sys.argv[1]), sys.argv[2]).acquire(); print('held', flush=True); time.sleep(120)"


@pytest.mark.parametrize("command", ["annotate", "sample"])
async def test_a_second_writer_of_the_same_out_is_refused(tmp_path, command):
    """Two runs appending to one --out would write every id twice: the second exits 2 naming the first."""
    out, inp = tmp_path / "rows.jsonl", tmp_path / "in.jsonl"
    inp.write_text('{"id": "x", "prompt": "hi", "candidates": [{"text": "a"}, {"text": "b"}]}\n')
    proc = subprocess.Popen([sys.executable, "-c", HOLD_OUT, str(out), f"moaa {command}"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        args = (["annotate", "--annotator", "127.0.0.1:9", "--in", str(inp)] if command == "annotate"
                else ["sample", "--model", str(tmp_path / "no-model"), "--prompts", str(inp)])
        rc, _, err = await run_moaa(*args, "--out", str(out), "--quiet")
        assert rc == 2 and f"--out {out} is in use by another moaa {command} (pid {proc.pid}" in err, err
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
