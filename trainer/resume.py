"""Finding the checkpoint a restarted run continues from.

A pod killed while saving leaves a checkpoint folder without `trainer_state.json` (the Trainer writes
it last); such a folder is skipped so the run resumes from the newest complete one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def newest_checkpoint(out_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` folder in `out_dir`, or None for a fresh start."""
    from transformers.trainer_utils import sort_checkpoints

    if not os.path.isdir(out_dir):
        return None
    for ckpt in reversed(sort_checkpoints(str(out_dir))):
        if (Path(ckpt) / "trainer_state.json").is_file():
            return ckpt
        log.warning("skipping incomplete checkpoint %s (no trainer_state.json)", ckpt)
    return None


def checkpoint_step(ckpt: str | Path) -> int:
    return int(json.loads((Path(ckpt) / "trainer_state.json").read_text())["global_step"])
