"""The run-folder lock (moaa/pipeline/lock.py) with real processes; the CLI side is in test_pipeline_run.py."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from moaa.errors import UserError
from moaa.pipeline.lock import RunLock

HOLD = "import sys, time; from moaa.pipeline.lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
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
