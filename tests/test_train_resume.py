"""Resume: the real `moaa train sft` process is SIGKILLed after a checkpoint exists, started again with
the same arguments, and must continue from that checkpoint with the same step count, data order and LR
schedule as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moaa.cli.main import main
from moaa.trainer.resume import newest_checkpoint
from tests.fixtures.trainer import sft_rows, write_jsonl

pytestmark = pytest.mark.slow

# 12 rows, global batch 4 -> 3 steps per epoch, shuffled per epoch: a wrong data order changes the losses.
# per-device batch 1 -> 4 accumulation micro-steps per step, which leaves time to kill between checkpoints.
ARGS = ["--max-steps", "9", "--save-steps", "3", "--batch-size", "4", "--per-device-batch-size", "1",
        "--max-length", "96", "--lr", "1e-3", "--schedule", "cosine", "--set", "warmup_steps=2", "--seed", "7"]


def _by_step(out, key):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}  # last value per step wins (re-done steps)


def test_killed_run_resumes_from_newest_checkpoint(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(12))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moaa.cli.main", "train", "sft", "--data", str(data),
           "--model", str(tiny_model_dir), "--out", str(out), *ARGS]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")  # no spinning on shared cores
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:  # bounded by the deadline and by the process ending
            if line.startswith("{") and json.loads(line)["event"] == "checkpoint":
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no checkpoint in time"
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = newest_checkpoint(out)
    assert ckpt is not None
    k = int(ckpt.rsplit("-", 1)[1])
    assert k in (3, 6), "killed before the run could finish"
    assert not (out / "manifest.json").exists()

    # save_steps may change on a resume (README) and takes effect: transformers would keep the checkpoint's
    again = subprocess.run([*cmd, "--save-steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    events = [json.loads(x) for x in again.stdout.splitlines() if x.startswith("{")]
    resume = next(e for e in events if e["event"] == "resume")
    start = next(e for e in events if e["event"] == "start")
    assert resume["step"] == k and start["step"] == k and start["resumed"] and start["total"] == 9
    steps = [e["step"] for e in events if e["event"] == "log" and "loss" in e]
    assert steps == list(range(k + 1, 10)), "continues at the step after the checkpoint"
    saved = [e["step"] for e in events if e["event"] == "checkpoint"]
    assert [s for s in saved if s < 9] == [s for s in range(k + 1, 9) if s % 2 == 0], saved
    # metrics.jsonl holds each step once: the steps run after the checkpoint before the kill were cut
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [s for s in logged if s < 9]
    assert logged == sorted(set(logged)) == list(range(1, 9)), logged
    man = json.loads((out / "manifest.json").read_text())
    assert man["final_step"] == 9 and man["resumed_from"].endswith(f"checkpoint-{k}")

    # the same run never interrupted, in process: same schedule and same data order -> same numbers
    ref = tmp_path / "ref"
    assert main(["train", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(ref), *ARGS]) == 0
    lr, lr_ref = _by_step(out, "learning_rate"), _by_step(ref, "learning_rate")
    loss, loss_ref = _by_step(out, "loss"), _by_step(ref, "loss")
    for step in range(k + 1, 10):
        assert lr[step] == pytest.approx(lr_ref[step], rel=1e-6), step
        assert loss[step] == pytest.approx(loss_ref[step], rel=1e-3), step


def test_incomplete_checkpoint_is_skipped(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-4").mkdir()  # killed while saving: no trainer_state.json
    assert newest_checkpoint(tmp_path).endswith("checkpoint-2")
    (tmp_path / "checkpoint-6").mkdir()  # killed while writing trainer_state.json itself
    (tmp_path / "checkpoint-6" / "trainer_state.json").write_text('{"global_st')
    assert newest_checkpoint(tmp_path).endswith("checkpoint-2")
    assert newest_checkpoint(tmp_path / "missing") is None


def test_run_killed_while_saving_resumes_from_the_checkpoint_before(tiny_model_dir, tmp_path):
    """The folder a kill during a save leaves (weights written, trainer_state.json not yet), end to end: the
    re-run resumes from the checkpoint before it, redoes the step and saves over the partial folder."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(4))
    out = tmp_path / "run"
    args = ["train", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out), "--max-steps", "3",
            "--save-steps", "1", "--batch-size", "4", "--per-device-batch-size", "4", "--max-length", "96", "--lr", "1e-3"]
    assert main(args) == 0
    ref = _by_step(out, "loss")
    ref_train_loss = json.loads((out / "manifest.json").read_text())["train_loss"]
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    for name in ("manifest.json", "metrics.jsonl", "model.safetensors"):
        (out / name).unlink()
    assert main(args) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["resumed_from"].endswith("checkpoint-2") and man["final_step"] == 3
    # the run's mean loss over all its steps, not over the steps after the resume (TRL's training_loss)
    assert man["train_loss"] == pytest.approx(ref_train_loss, rel=1e-4)
    assert _by_step(out, "loss")[3] == pytest.approx(ref[3], rel=1e-4)
    assert newest_checkpoint(out).endswith("checkpoint-3")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGINT, 130, "moaa: interrupted"),
                                              (signal.SIGTERM, 143, "moaa: terminated (SIGTERM)")])
def test_stopped_run_says_so_in_one_line(tiny_model_dir, tmp_path, sig, code, line):
    """Ctrl-C, or the SIGTERM a pod gets when it is evicted or a Job deleted: one line and a non-zero exit, no
    traceback (SIGTERM ended the process silently), and a re-run resumes from the checkpoint."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(12))
    cmd = [sys.executable, "-m", "moaa.cli.main", "train", "sft", "--data", str(data), "--model", str(tiny_model_dir),
           "--out", str(tmp_path / "run"), *ARGS]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for out_line in proc.stdout:  # bounded by the process ending
            if out_line.startswith("{") and json.loads(out_line)["event"] == "checkpoint":
                proc.send_signal(sig)
                break
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == code, err[-2000:]
    assert err.splitlines()[-1] == line and "Traceback" not in err, err[-2000:]
    assert newest_checkpoint(tmp_path / "run") is not None
