"""The trainer's commands (`moaa train sft|dpo|submit`, `moaa sample`) run as child processes.

A child process keeps the trainer's memory and threads out of the pipeline and matches what a
Kubernetes Job runs. The child dies with the pipeline (PR_SET_PDEATHSIG), so a SIGKILLed pipeline
leaves no orphan writing into the run folder; a re-run then resumes from the trainer's newest
checkpoint (the trainer does that itself). Progress comes from the trainer's JSON lines on stdout.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import deque
from pathlib import Path
from typing import Callable

from moaa.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, MoaaError, TransientError, UserError
from moaa.progress import StageProgress
from moaa.services.local.lifeline import die_with_parent
from moaa.trainer.manifest import model_done


def moaa_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "moaa.cli.main", *args]


async def run_child(cmd: list[str], *, log_path: Path, what: str,
                    on_json: Callable[[dict], None] | None = None) -> None:
    """Run a moaa child command; JSON lines on stdout go to `on_json`, everything to `log_path`.

    Exit codes keep their meaning: 2 -> UserError, 75 -> TransientError, other -> MoaaError, each
    with the child's last error line.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Spinning OpenMP threads slow torch badly on 2 shared cores (measured by the local backend: 5-10x).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    tail: deque[str] = deque(maxlen=40)
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
            preexec_fn=die_with_parent, limit=16 * 1024 * 1024)
        try:
            assert proc.stdout is not None
            async for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                tail.append(line)
                if on_json and line.startswith("{"):
                    try:
                        on_json(json.loads(line))
                    except ValueError:
                        pass
            rc = await proc.wait()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
    if rc == 0:
        return
    reason = next((ln for ln in reversed(tail) if "error" in ln.lower()), tail[-1] if tail else "no output")
    reason = reason.removeprefix("moaa: error: ").strip()
    msg = f"{what} failed (exit {rc}): {reason} (log: {log_path})"
    if rc == EXIT_BAD_INPUT:
        raise UserError(msg)
    if rc == EXIT_TRANSIENT:
        raise TransientError(msg)
    raise MoaaError(msg)


def train_config(kind: str, settings: dict, *, data: Path, model: str, out: Path):
    """The typed SFTSettings / DPOSettings of one training stage from the pipeline's `sft.*` / `dpo.*`.

    Built (and checked) when the pipeline starts and again, identically, when the stage runs; a bad value
    is one UserError line naming the `--set` key. The TRL layer is checked by `check_with_trl`."""
    from moaa.trainer.config import build_train_config

    values = {**settings, "data": str(data), "model": str(model), "out": str(out)}
    return build_train_config(kind, values, where=f"{kind} settings (--set {kind}.KEY=VALUE)", trl_check=False)


async def check_with_trl(configs: list, *, log_dir: Path, k8s_args: list[str] | None = None) -> None:
    """`moaa train KIND ... --check` for each config, side by side: the exact argv the trainer will get,
    checked against the installed TRL in a child (TRL and torch stay out of the pipeline's memory); for
    this machine, or with `k8s_args` (--k8s) for the Jobs' GPU nodes, and then each stage's Job is built
    too (`moaa train submit ... --dry-run`): job settings and an --out the Jobs cannot write to fail now,
    not after stage 1."""
    from moaa.trainer.config import cli_args

    where = "here" if k8s_args is None else "job"
    checks = [run_child(moaa_command("train", cfg.kind, *cli_args(cfg), "--check", where),
                        log_path=log_dir / f"{cfg.kind}-check.log",
                        what=f"checking --set {cfg.kind}.* against the installed TRL") for cfg in configs]
    if k8s_args is not None:
        checks += [run_child(moaa_command("train", "submit", cfg.kind, *cli_args(cfg), *k8s_args, "--dry-run"),
                             log_path=log_dir / f"{cfg.kind}-job.log", what=f"checking the {cfg.kind.upper()} Job")
                   for cfg in configs]
    results = await asyncio.gather(*checks, return_exceptions=True)
    for err in results:
        if isinstance(err, BaseException):
            raise err


async def train(kind: str, *, data: Path, model: str, out: Path, settings: dict, log_path: Path,
                progress: StageProgress, k8s: bool = False, k8s_args: list[str] | None = None) -> dict:
    """`moaa train KIND` (or `moaa train submit KIND` with k8s) until the final model is saved.

    The typed config travels as `cli_args` (the serialiser Jobs and torchrun workers use too)."""
    from moaa.trainer.config import cli_args

    args = cli_args(train_config(kind, settings, data=data, model=model, out=out))
    cmd = moaa_command("train", "submit", kind, *args, *(k8s_args or [])) if k8s else moaa_command("train", kind, *args)
    state = {"resumed_from": None}

    def on_json(rec: dict) -> None:
        if rec.get("event") == "resume":
            state["resumed_from"] = rec.get("checkpoint")
            state["resumed_step"] = rec.get("step")
            return   # the "start" event that follows says it, with the total
        if rec.get("event") == "start" and rec.get("resumed") and isinstance(rec.get("step"), int):
            progress.resume_at(rec["step"], rec.get("total"))   # said once; the steps before are not this run's rate
            return
        if isinstance(rec.get("total"), int) and rec["total"] > 0:
            progress.set_total(rec["total"])
        if isinstance(rec.get("step"), int):
            post = {"loss": f"{rec['loss']:.4f}"} if isinstance(rec.get("loss"), (int, float)) else {}
            progress.set(rec["step"], **post)

    await run_child(cmd, log_path=log_path, what=f"{kind.upper()} training", on_json=on_json)
    manifest = model_done(out)
    if manifest is None and k8s:
        raise UserError(f"the {kind.upper()} Job finished but {out}/manifest.json is not visible here: run the "
                        "pipeline where --out is on the volume the training Jobs mount, at the same path")
    if manifest is None:
        raise MoaaError(f"{kind.upper()} training exited without saving a final model in {out} (log: {log_path})")
    return {**state, "final_step": manifest.get("final_step"), "train_loss": manifest.get("train_loss")}


async def sample(*, model: Path, prompts: Path, out: Path, n: int, max_new_tokens: int, temperature: float,
                 log_path: Path, progress: StageProgress, seed: int = 0, sequences_per_call: int = 24) -> None:
    """`moaa sample`: n answers per prompt from a trained model, appended to `out` and resumed by id.

    A generate call decodes its sequences in lock-step, so the batch is sized in sequences: 8 prompts of
    n = 3 samples, or all 10 eval prompts at n = 1 in one call instead of two (one decode, not two)."""
    batch_size = max(1, sequences_per_call // n)
    cmd = moaa_command("sample", "--model", str(model), "--prompts", str(prompts), "--out", str(out),
                       "--n", str(n), "--max-new-tokens", str(max_new_tokens), "--temperature", str(temperature),
                       "--seed", str(seed), "--batch-size", str(batch_size))

    def on_json(rec: dict) -> None:
        done = rec.get("already_done", rec.get("done"))
        if isinstance(done, int):
            progress.set(done)

    await run_child(cmd, log_path=log_path, what="sampling", on_json=on_json)
