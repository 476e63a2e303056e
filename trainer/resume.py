"""Finding the checkpoint a restarted run continues from, and refusing to continue another run's.

A pod killed while saving leaves a checkpoint folder without a readable `trainer_state.json` (the Trainer
writes it last); such a folder is skipped so the run resumes from the newest complete one.

An output folder records the settings and data of its run (`run_config.json`); starting a run with other
settings in a folder that holds checkpoints or a final model is refused (exit 2) rather than resumed: the
optimizer state, schedule and data order of the checkpoint belong to the old settings.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from moaa.errors import UserError

log = logging.getLogger(__name__)


def newest_checkpoint(out_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` folder in `out_dir`, or None for a fresh start."""
    from transformers.trainer_utils import sort_checkpoints

    if not os.path.isdir(out_dir):
        return None
    for ckpt in reversed(sort_checkpoints(str(out_dir))):
        try:
            checkpoint_step(ckpt)
            return ckpt
        except (OSError, ValueError, KeyError):
            log.warning("skipping incomplete checkpoint %s (no readable trainer_state.json)", ckpt)
    return None


def checkpoint_step(ckpt: str | Path) -> int:
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"])


RUN_CONFIG = "run_config.json"
# settings that may differ when a run is resumed: no number the run computes depends on them
MAY_CHANGE = ("startup_timeout_s", "save_steps", "save_total_limit", "logging_steps", "eval_data", "data", "out")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def guard_out(out_dir: str | Path, config: dict[str, Any], data_sha256: str, *, write: bool = True) -> None:
    """Refuse a folder holding another run's checkpoints or final model; record this run's settings."""
    from moaa.files import check_folder

    out = check_folder(out_dir)
    if out.resolve() == Path(config["model"]).resolve():
        raise UserError(f"--out {out} is the model folder itself: training would overwrite the model it starts from")
    record = {"config": {k: v for k, v in config.items() if k not in MAY_CHANGE}, "data_sha256": data_sha256}
    path = out / RUN_CONFIG
    started = newest_checkpoint(out) or (out / "manifest.json").is_file()
    if started and path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k} {_short(old['config'].get(k))} -> {_short(record['config'].get(k))}"
                for k in sorted(set(old["config"]) | set(record["config"]))
                if old["config"].get(k) != record["config"].get(k)]
        if old.get("data_sha256") != data_sha256:
            diff.append("the data file's content (sha256)")
        if diff:
            raise UserError(f"{out} holds a run with other settings ({'; '.join(diff)}); use another --out folder, "
                            "or the settings and data of that run to resume it")
    if write:
        from moaa.files import atomic_write_json

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
