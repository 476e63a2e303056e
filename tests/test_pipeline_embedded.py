"""The headline command on the real embedded stack: `moaa pipeline run` with no --gateway starts the model
server (transformers, on a tiny model via $MOAA_LOCAL_MODEL), `moaa gateway serve` and `moaa annotator
serve` as processes, and runs every stage through them, to the report. A second test SIGKILLs it in the
DPO stage (after stage 1, SFT, sampling and judging), checks that no process of the killed run survives,
and resumes it to the end.

The model is the tiny one's verdict variant (services/local/tiny.py): it plays proposers, aggregator and
judges like SmolLM2 does, and its judges give "[[A]]"/"[[B]]" verdicts that depend on the prompt and the
order of the answers, so stage 2 yields preference pairs and DPO and eval run. (The plain tiny model
writes random words: every verdict abstains and stage 2 ends with no pairs.)
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

N_PROMPTS = 20
HELD_OUT = round(N_PROMPTS * 0.2)          # eval prompts (by id hash)
STAGES = ["sft_data", "sft", "samples", "pairs", "dpo", "answers", "training_effect", "eval"]


def _prompts(path: Path, n: int = N_PROMPTS) -> Path:
    rows = [{"instruction": f"Explain topic number {i} in one short paragraph."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cmd(prompts: Path, out: Path) -> list[str]:
    """The whole pipeline, kept small: short answers and samples, 4 SFT and 4 DPO steps."""
    sets = ["answer_tokens=16", "sample_tokens=12", "sft.max_steps=4", "sft.save_steps=2", "dpo.max_steps=4",
            "dpo.save_steps=2"]
    return [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--prompts", str(prompts),
            "--out", str(out), "--engine", "transformers", *[a for kv in sets for a in ("--set", kv)]]


def _env(model_dir: Path) -> dict:
    return {**os.environ, "MOAA_LOCAL_MODEL": str(model_dir)}


def _ids(folder: Path, name: str = "data-*.jsonl") -> list[str]:
    return [json.loads(line)["id"] for shard in sorted(folder.glob(name))
            for line in shard.read_text().splitlines() if line.strip()]


def _check_finished(out: Path) -> dict:
    """Every stage done, every id exactly once in each stage's data, the ledger equal to the rows' usage,
    summary.json with every stage. Returns the summary."""
    from moaa.pipeline.budget import TokenLedger
    from moaa.pipeline.store import DatasetStore

    run = json.loads((out / "run.json").read_text())
    assert [s for s, v in run["stages"].items() if v["status"] == "done"] == STAGES
    # stage 1 answers every prompt (the eval prompts' answers measure SFT); stage 2 the training prompts
    for folder, n in (("stage1-sft-data", N_PROMPTS), ("stage2-samples", N_PROMPTS - HELD_OUT)):
        ids = _ids(out / folder)
        assert len(ids) == len(set(ids)) == n, folder
    pairs, skipped = _ids(out / "stage2-pairs"), _ids(out / "stage2-pairs", "skipped.jsonl")
    assert sorted(pairs + skipped) == sorted(_ids(out / "stage2-samples"))        # each id exactly once
    assert len(pairs) >= 5, (len(pairs), run["stages"]["pairs"])
    split = run["stages"]["pairs"]["result"]
    assert split["train_rows"] >= 1 and split["heldout_rows"] >= 1
    assert split["train_rows"] + split["heldout_rows"] == len(pairs)
    # the token ledger: each service stage's tokens are the usage journaled with its rows
    ledger = TokenLedger(out / "usage.json")
    for folder, stage, fmt in (("stage1-sft-data", "sft_data", "sft"), ("stage2-pairs", "pairs", "preference"),
                               ("eval/judgments", "eval", "generations")):
        store = DatasetStore(out / folder, stage=stage, fmt=fmt).open()
        journaled = sum(u["prompt_tokens"] + u["completion_tokens"] for u in store.usage.values())
        assert journaled > 0 and ledger.stage_total(stage) == journaled, stage
    summary = json.loads((out / "summary.json").read_text())
    assert set(STAGES) <= set(summary), sorted(summary)
    assert summary["dpo"]["final_step"] == 4 and summary["sft"]["final_step"] == 4
    assert {"sft_heldout_loss", "dpo_reward_accuracy"} <= set(summary["training_effect"])
    assert [(w["model"], w["baseline"]) for w in summary["eval"]["winrates"]][:3] == \
        [("sft", "base"), ("dpo", "base"), ("dpo", "sft")]
    assert summary["tokens"]["total_tokens"] == ledger.total
    assert (out / "report" / "report.md").exists()
    return summary


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
                    child = seen.setdefault(child.pid, child)
                    try:  # read again each time: a child seen between fork and exec shows its parent's cmdline
                        child.seen_cmdline = " ".join(child.cmdline())
                    except (psutil.NoSuchProcess, psutil.ZombieProcess):
                        pass
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


async def test_headline_command_on_the_embedded_stack(tiny_verdict_model_dir, tmp_path):
    t0 = time.monotonic()
    out = tmp_path / "run"
    rc, err, seen = await _run(_cmd(_prompts(tmp_path / "p.jsonl"), out), _env(tiny_verdict_model_dir))
    assert rc == 0, err
    _check_finished(out)
    # engine, gateway and annotator ran as processes, the services started the one way, each under a
    # lifeline supervisor; all were stopped with the run
    cmdlines = [getattr(p, "seen_cmdline", "") for p in seen.values()]
    for part in ("moaa.cli.main gateway serve", "moaa.cli.main annotator serve", "transformers serve"):
        assert any(part in c for c in cmdlines), (part, cmdlines)
    assert sum("moaa.services.local.lifeline" in c for c in cmdlines) == 3, cmdlines
    assert not await _gone(seen, timeout=10)
    print(f"embedded pipeline, every stage: {time.monotonic() - t0:.0f} s")


async def test_sigkilled_embedded_run_leaves_no_process_and_resumes(tiny_verdict_model_dir, tmp_path):
    """SIGKILL in the DPO stage, once its first checkpoint is saved (stage 2 judging takes ~2 s here, too
    short to hit reliably; the emulator tests kill it there), then the same command to the end: DPO goes
    on from its checkpoint and no row of an earlier stage is redone."""
    t0 = time.monotonic()
    out = tmp_path / "run"
    cmd = _cmd(_prompts(tmp_path / "p.jsonl"), out)
    env = _env(tiny_verdict_model_dir)
    checkpoint = out / "dpo-model" / "checkpoint-2" / "trainer_state.json"   # written last in a checkpoint
    rc, _, seen = await _run(cmd, env, kill_when=checkpoint.exists)
    assert rc == -signal.SIGKILL, "DPO finished before the kill"
    assert len(seen) >= 6  # engine, gateway, annotator and their supervisors were up
    left = await _gone(seen, timeout=20)  # the lifeline: SIGTERM at once, SIGKILL after its grace period
    assert not left, left
    assert json.loads((out / "run.json").read_text())["stages"]["dpo"]["status"] == "running"
    before = {folder: _ids(out / folder) + _ids(out / folder, "skipped.jsonl")
              for folder in ("stage1-sft-data", "stage2-samples", "stage2-pairs")}
    rc, err, seen = await _run(cmd, env)
    assert rc == 0, err
    summary = _check_finished(out)
    assert "checkpoint-2" in (summary["dpo"]["resumed_from"] or ""), summary["dpo"]
    for folder, ids in before.items():   # the finished stages were kept, not redone
        assert _ids(out / folder) + _ids(out / folder, "skipped.jsonl") == ids, folder
    assert json.loads((out / "run.json").read_text())["runs"] == 2
    assert not await _gone(seen, timeout=10)
    print(f"embedded pipeline, killed in DPO and resumed: {time.monotonic() - t0:.0f} s")
