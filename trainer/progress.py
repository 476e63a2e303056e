"""Progress as JSON lines on stdout (what `moaa train submit` follows) and a metrics JSONL file."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from transformers import TrainerCallback


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # keep the line valid JSON; a NaN loss must still be visible
    return value


def run_mean_loss(log_history: list[dict], fallback: float) -> float:
    """The mean training loss over every step of the run, a resumed run's earlier steps included: the state a
    checkpoint restores keeps their logs, while TRL's training_loss averages only the steps this process ran
    (a run resumed at step k would report another loss than the same run uninterrupted). Each log holds the
    mean since the one before, so it weighs by the steps it covers; JsonProgress logs at every checkpoint and
    at the last step, so the logs cover every step whatever logging_steps is."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and entry.get("step", 0) > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else fallback


class JsonProgress(TrainerCallback):
    """One JSON line per logging step: step, total, loss, rate, ETA; the same rows go to metrics.jsonl."""

    def __init__(self, metrics_path: str | Path, stream=None, kind: str = "sft"):
        self.metrics_path = Path(metrics_path)
        self.stream = stream or sys.stdout
        self.kind = kind
        self._t0 = None
        self._step0 = 0

    def _emit(self, record: dict, state) -> None:
        if not state.is_world_process_zero:
            return
        line = json.dumps({k: _clean(v) for k, v in record.items()})
        print(line, file=self.stream, flush=True)
        if record.get("event") == "log":
            with open(self.metrics_path, "a") as f:
                f.write(line + "\n")

    def on_train_begin(self, args, state, control, **kw):
        self._t0, self._step0 = time.monotonic(), state.global_step
        if state.global_step and state.is_world_process_zero and self.metrics_path.exists():
            # resumed: the steps logged after the checkpoint, before the kill, are run again
            self._cut_after(state.global_step)
        # the cadence a resumed run keeps is the one asked for now: transformers restores the checkpoint's
        # save/logging/eval steps from trainer_state.json over the arguments (README: these may change)
        state.compute_steps(args, state.max_steps)
        self._emit({"event": "start", "kind": self.kind, "step": state.global_step, "total": state.max_steps,
                    "resumed": state.global_step > 0}, state)

    def _cut_after(self, step: int) -> None:
        from moaa.files import atomic_write_text
        from moaa.jsonl import read_rows   # the one JSONL reader: a line torn by the kill is left out

        kept = [row for row in read_rows(self.metrics_path, key=None) if row.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, (json.dumps(row) + "\n" for row in kept))

    def on_step_end(self, args, state, control, **kw):
        # a log at each checkpoint and at the end: the loss of the steps since the last log would otherwise
        # be lost with a killed process, or left out of the run's mean (logging_steps > 1)
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_epoch_end(self, args, state, control, **kw):
        if control.should_save:   # save_strategy epoch: a checkpoint at the epoch's end, logged with it
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        if "train_loss" in logs:   # TRL's is the mean over this process's steps: the run's, as the manifest says
            logs["train_loss"] = run_mean_loss(state.log_history, logs["train_loss"])
        done = state.global_step - self._step0
        elapsed = time.monotonic() - (self._t0 or time.monotonic())
        rate = done / elapsed if done > 0 and elapsed > 0 else None  # optimizer steps per second, this process
        eta = (state.max_steps - state.global_step) / rate if rate else None
        record = {"event": "log", "step": state.global_step, "total": state.max_steps,
                  "epoch": round(state.epoch or 0.0, 4), "eta_s": round(eta, 1) if eta is not None else None,
                  "steps_per_s": round(rate, 4) if rate else None, "elapsed_s": round(elapsed, 2)}
        record.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        self._emit(record, state)

    def on_save(self, args, state, control, **kw):
        self._emit({"event": "checkpoint", "step": state.global_step, "total": state.max_steps}, state)

    def on_train_end(self, args, state, control, **kw):
        self._emit({"event": "end", "step": state.global_step, "total": state.max_steps}, state)

