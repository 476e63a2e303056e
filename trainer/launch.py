"""One process per GPU: `moaa train KIND --nproc-per-node N` starts torchrun (or accelerate) itself.

The launching process checks config and data first, so bad input still exits 2 once (the Job's
podFailurePolicy fails at once) instead of N workers failing. Workers run the resolved config as
arguments. torchrun reports any worker failure as exit 1, which the Job retries within backoffLimit.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

from moaa.trainer.config import TrainConfig, cli_args
from moaa.trainer.data import load_data

log = logging.getLogger(__name__)


def is_worker() -> bool:
    return "LOCAL_RANK" in os.environ


def launch_command(cfg: TrainConfig, nproc: int, launcher: str) -> list[str]:
    child = ["-m", "moaa.cli.main", "train", cfg.kind, *cli_args(cfg)]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *child]


def launch(cfg: TrainConfig, nproc: int, launcher: str = "torchrun") -> int:
    load_data(cfg.data, cfg.eval_data, cfg.kind, drop_duplicates=cfg.drop_duplicates)  # bad data: exit 2 here, once
    cmd = launch_command(cfg, nproc, launcher)
    log.info("starting %s", " ".join(cmd))
    print(f'{{"event": "launch", "launcher": "{launcher}", "nproc": {nproc}}}', flush=True)
    return subprocess.call(cmd)
