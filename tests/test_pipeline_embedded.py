"""The headline command on the real embedded stack: `moaa pipeline run` with no --gateway starts the model
server (transformers, on the tiny model via $MOAA_LOCAL_MODEL), `moaa gateway serve` and `moaa annotator
serve` as processes, and runs the stages through them. A second test SIGKILLs it mid-run, checks that no
process of the killed run survives, and resumes.

The tiny model is random: it writes words but cannot judge, so every pairwise verdict abstains and stage 2
ends with no pairs. These tests therefore stop after the samples stage (--until samples); the stages after
it run against emulated judges in tests/test_pipeline_run.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

N_PROMPTS = 30


def _prompts(path: Path, n: int = N_PROMPTS) -> Path:
    rows = [{"instruction": f"Explain topic number {i} in one short paragraph."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cmd(prompts: Path, out: Path, until: str) -> list[str]:
    return [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--prompts", str(prompts),
            "--out", str(out), "--engine", "transformers", "--until", until, "--set", "answer_tokens=16",
            "--set", "sample_tokens=12", "--set", "sft.max_steps=4"]


def _env(tiny_model_dir: Path) -> dict:
    return {**os.environ, "MOAA_LOCAL_MODEL": str(tiny_model_dir)}


def _ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for shard in sorted(folder.glob("data-*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]


def _alive(procs: dict[int, psutil.Process]) -> list[str]:
    left = []
    for p in procs.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:200])
        except psutil.NoSuchProcess:
            pass
    return left


async def _gone(procs: dict[int, psutil.Process], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while _alive(procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    return _alive(procs)


async def _run(cmd, env, *, kill_when=None, timeout=900.0):
    """Run the pipeline, recording every process it starts (psutil). With `kill_when`, SIGKILL it as soon as
    that is true. Returns (exit code, stderr, the processes seen)."""
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    err_task = asyncio.ensure_future(proc.stderr.read())
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.returncode is None and time.monotonic() < deadline:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    if child.pid not in seen:
                        seen[child.pid] = child
                        child.seen_cmdline = " ".join(child.cmdline())
            except psutil.NoSuchProcess:
                pass
            if kill_when is not None and kill_when():
                os.kill(proc.pid, signal.SIGKILL)
                break
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.1)
            except asyncio.TimeoutError:
                pass
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode, (await err_task).decode(), seen


async def test_headline_command_on_the_embedded_stack(tiny_model_dir, tmp_path):
    t0 = time.monotonic()
    out = tmp_path / "run"
    rc, err, seen = await _run(_cmd(_prompts(tmp_path / "p.jsonl"), out, "samples"), _env(tiny_model_dir))
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert [s for s, v in run["stages"].items() if v["status"] == "done"] == ["sft_data", "sft", "samples"]
    held_out = round(N_PROMPTS * 0.2)
    # stage 1 answers every prompt (the eval prompts' answers are held out to measure SFT on); stage 2
    # samples the training prompts only
    for folder, n in (("stage1-sft-data", N_PROMPTS), ("stage2-samples", N_PROMPTS - held_out)):
        ids = _ids(out / folder)
        assert len(ids) == len(set(ids)) == n, folder
    # engine, gateway and annotator ran as processes, the services started the one way, each under a
    # lifeline supervisor; all were stopped with the run
    cmdlines = [getattr(p, "seen_cmdline", "") for p in seen.values()]
    for part in ("moaa.cli.main gateway serve", "moaa.cli.main annotator serve", "transformers serve"):
        assert any(part in c for c in cmdlines), (part, cmdlines)
    assert sum("moaa.services.local.lifeline" in c for c in cmdlines) == 3, cmdlines
    assert not await _gone(seen, timeout=10)
    print(f"embedded pipeline --until samples: {time.monotonic() - t0:.0f} s")


async def test_sigkilled_embedded_run_leaves_no_process_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(_prompts(tmp_path / "p.jsonl"), out, "sft_data")
    shard = out / "stage1-sft-data" / "data-00000.jsonl"
    env = _env(tiny_model_dir)
    rc, _, seen = await _run(cmd, env, kill_when=lambda: shard.exists() and shard.read_text().count("\n") >= 3)
    assert rc == -signal.SIGKILL, "stage 1 finished before the kill"
    assert len(seen) >= 6  # engine, gateway, annotator and their supervisors were up
    left = await _gone(seen, timeout=20)  # the lifeline: SIGTERM at once, SIGKILL after its grace period
    assert not left, left
    partial = _ids(out / "stage1-sft-data")
    assert 3 <= len(partial) < N_PROMPTS
    rc, err, seen = await _run(cmd, env)
    assert rc == 0, err
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == N_PROMPTS   # every id exactly once (eval prompts' answers included)
    assert set(partial) <= set(ids)
    assert not await _gone(seen, timeout=10)
