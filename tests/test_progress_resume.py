"""Long work shows progress and can be resumed, checked from the outside.

The one progress display (`moaa.progress.StageProgress`, tqdm) on a terminal and in a log; and the
long commands as real subprocesses, SIGKILLed mid-run and run again: `moaa annotate` against a real annotator
over the judge emulator, `moaa sample` on the tiny random model, `moaa pipeline run` (stage 1) over the gateway.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time

import pytest

from moaa import progress as progress_mod
from moaa.progress import StageProgress
from moaa.services.annotator.server import start_annotator
from moaa.services.config import parse_config
from moaa.services.emulator import Emulator, EmulatorSettings
from tests.fixtures.annotator import judge_config
from tests.fixtures.kill import kill_when as _kill_when

GOOD = "Paris is the capital of France."
BAD = "Bananas are yellow."


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


# --- the one progress display ------------------------------------------------------------------------------

def test_progress_in_a_log_is_whole_lines_bounded_in_number(monkeypatch):
    """Not a terminal (CI, `kubectl logs`): no carriage returns, and 20,000 quick updates make 2 lines, not
    thousands of redraws; each line has count/total, rate and ETA."""
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    log = io.StringIO()
    with StageProgress("stage 1: MoA answers", 20_000, 0, stream=log) as bar:
        for _ in range(20_000):
            bar.advance()
        for _ in range(500):
            bar.advance(failed=True)    # failures redraw too, within the same bound
    assert "\r" not in log.getvalue()
    lines = _lines(log)
    assert len(lines) <= 3, lines
    assert "20000/20000" in lines[-1] and "row/s" in lines[-1] and "failed=500" in lines[-1]

    monkeypatch.setattr(progress_mod, "LOG_INTERVAL_S", 0.05)   # a long run: one line per interval
    log = io.StringIO()
    with StageProgress("pairs", 40, 0, stream=log) as bar:
        for _ in range(40):
            time.sleep(0.01)
            bar.advance()
    lines = _lines(log)
    assert 3 <= len(lines) <= 14, lines
    middle = lines[len(lines) // 2]
    assert "/40 [" in middle and "row/s" in middle and "<00:" in middle, middle   # count/total, rate, ETA


def test_progress_on_a_terminal_redraws_in_place(monkeypatch):
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    term = _Terminal()
    with StageProgress("annotate", 30, 0, stream=term) as bar:
        for _ in range(30):
            time.sleep(0.02)
            bar.advance()
    text = term.getvalue()
    assert text.count("\r") >= 2 and text.count("\n") == 1 and "30/30" in text


def _read_pty(fd: int) -> str:
    import select

    buf = b""
    while select.select([fd], [], [], 0.2)[0]:
        buf += os.read(fd, 65536)
    return buf.decode()


@pytest.mark.parametrize("columns", [100, 0])
def test_progress_on_a_real_pseudo_terminal_and_one_without_a_size(monkeypatch, columns):
    """A terminal with a width redraws in place; one of 0 columns (a container with -t and no size) used to
    show nothing at all: it gets line mode."""
    import fcntl
    import struct
    import termios

    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    main, sub = os.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    with os.fdopen(sub, "w") as stream:
        with StageProgress("pty", 20, 5, stream=stream) as bar:
            for _ in range(15):
                bar.advance()
        text = _read_pty(main)
    os.close(main)
    assert text.startswith("pty: resuming: 5 of 20 rows done, 15 left") and "20/20" in text, repr(text)
    assert ("\r" + "pty:" in text) == (columns > 0), repr(text)


def test_a_resumed_run_says_how_many_are_done_and_left_and_a_finished_one_says_nothing_to_do(monkeypatch):
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    log = io.StringIO()
    with StageProgress("sampling", 10, 4, unit="prompt", stream=log) as bar:
        bar.advance(6)
    assert _lines(log)[0] == "sampling: resuming: 4 of 10 prompts done, 6 left"
    log = io.StringIO()
    StageProgress("sampling", 10, 10, unit="prompt", stream=log).close()
    assert _lines(log) == ["sampling: all 10 prompts done in an earlier run; nothing to do"]
    log = io.StringIO()
    StageProgress("sampling", 10, 0, unit="prompt", stream=log).close()
    assert "resuming" not in log.getvalue()


def test_quiet_and_log_level_warning_silence_progress(monkeypatch):
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    log = io.StringIO()
    with StageProgress("x", 5, 2, quiet=True, stream=log) as bar:
        bar.advance(3)
    assert log.getvalue() == ""
    monkeypatch.setenv("MOAA_LOG_LEVEL", "warning")
    with StageProgress("x", 5, 2, stream=log) as bar:
        bar.advance(3)
    assert log.getvalue() == ""
    monkeypatch.setenv("MOAA_LOG_LEVEL", "INFO")
    with StageProgress("x", 5, 2, stream=log) as bar:
        bar.advance(3)
    assert "resuming" in log.getvalue()


def test_training_steps_set_through_update_are_bounded_too(monkeypatch):
    """`set` (training steps, samples from a child) goes through tqdm's update: rate shown, redraws bounded."""
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    log = io.StringIO()
    with StageProgress("SFT training", 0, 0, unit="step", stream=log) as bar:
        bar.set_total(5000)
        for step in range(1, 5001):
            bar.set(step, loss=0.5)
    lines = _lines(log)
    assert len(lines) <= 3 and "5000/5000" in lines[-1] and "loss=0.5" in lines[-1], lines


# --- moaa annotate, killed and run again --------------------------------------------------------------------

def _moaa(*args: str) -> list[str]:
    return [sys.executable, "-m", "moaa.cli.main", *args]


async def _run(cmd, timeout=180, env=None):
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def _settled(emu) -> None:
    """Wait until the calls the killed client left in flight at the server are over (or cancelled), so that
    the emulator's count after a reset is the re-run's alone."""
    last, still = -1, 0.0
    while still < 1.0:
        await asyncio.sleep(0.1)
        now = emu.stats.requests
        still = still + 0.1 if now == last else 0.0
        last = now
    emu.reset()


def _count_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _ids(path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]   # json.loads: no torn line


@pytest.fixture
async def slow_annotator():
    """A real annotator over a judge emulator slow enough (0.3 s per judge call) to be killed mid-run."""
    emu = Emulator(EmulatorSettings(judge=True, ttft_s=0.3))
    await emu.start()
    cfg = judge_config(emu.url, {"a": "keyword:paris", "b": "keyword:capital"}, mode="pointwise", combine="mean")
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    yield emu, server
    await server.stop(0)
    await emu.stop()


async def test_annotate_sigkill_then_resume_exactly_once_then_nothing_to_do(tmp_path, slow_annotator):
    emu, server = slow_annotator
    n = 40
    inp, out = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": [{"role": "user", "content": "Capital of France?"}],
                                       "candidates": [{"text": BAD, "model": "sft"}, {"text": GOOD, "model": "sft"}]})
                           + "\n" for i in range(n)))
    cmd = _moaa("annotate", "--annotator", server.address, "--in", str(inp), "--out", str(out))
    assert await _kill_when(cmd, lambda: _count_lines(out) >= 3), "annotate finished before the kill"
    partial = _ids(out)
    assert 3 <= len(partial) < n and len(set(partial)) == len(partial)

    await _settled(emu)
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == n and set(partial) <= set(ids)
    assert emu.stats.requests == 2 * (n - len(partial))      # only what was left: 2 judges per row, none redone
    assert stdout == ""                                        # progress and counts on stderr only
    assert f"annotate: resuming: {len(partial)} of {n} rows done, {n - len(partial)} left" in err, err
    assert "\r" not in err and f"{n}/{n}" in err and "row/s" in err   # a pipe: line mode

    report = (tmp_path / "pairs.jsonl.report.json").read_text()
    emu.reset()
    t0 = time.monotonic()
    rc, stdout, err = await _run(cmd)
    assert rc == 0 and emu.stats.requests == 0 and _ids(out) == ids, err
    assert f"annotate: all {n} rows done in an earlier run; nothing to do" in err, err
    assert f"0 pairs written, 0 skipped, {n} already done" in err
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "pairs.jsonl.report.json").read_text() == report   # the judges' report of the last run stays

    # the annotator gone: a finished run still has nothing to do, without a call
    rc, _, err = await _run(_moaa("annotate", "--annotator", "127.0.0.1:9", "--in", str(inp), "--out", str(out),
                                  "--quiet"))
    assert rc == 0 and err.strip() == f"0 pairs written, 0 skipped, {n} already done; report: {out}.report.json"


# --- moaa sample on the tiny random model -------------------------------------------------------------------

@pytest.mark.slow
async def test_sample_sigkill_then_resume_exactly_once_then_nothing_to_do(tmp_path, tiny_model_dir):
    n = 30
    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "cands.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": [{"role": "user", "content": f"Say {i}."}]}) + "\n"
                               for i in range(n)))
    cmd = _moaa("sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out", str(out), "--n", "2",
                "--max-new-tokens", "4", "--batch-size", "1", "--engine", "transformers")
    assert await _kill_when(cmd, lambda: _count_lines(out) >= 2, timeout=240), "sample finished before the kill"
    partial = _ids(out)
    assert 2 <= len(partial) < n

    rc, stdout, err = await _run(cmd, timeout=300)
    assert rc == 0, err
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == n and set(partial) <= set(ids)
    events = [json.loads(line) for line in stdout.splitlines()]   # stdout: JSON events only
    assert events[0]["already_done"] == len(partial)
    assert events[-1] == {"event": "progress", "done": n, "total": n}
    assert f"sampling: resuming: {len(partial)} of {n} prompts done, {n - len(partial)} left" in err, err
    assert "\r" not in err and f"{n}/{n}" in err

    rc, stdout, err = await _run(cmd)
    assert rc == 0 and _ids(out) == ids and json.loads(stdout.splitlines()[0])["already_done"] == n
    assert f"sampling: all {n} prompts done in an earlier run; nothing to do" in err, err


# --- moaa pipeline run (stage 1 over the gateway) -----------------------------------------------------------

@pytest.fixture(scope="module")
async def gateway_and_annotator(emulator_factory, judge_emulator):
    from moaa.services.gateway.server import start_gateway
    from tests.fixtures.gateway import moa_config

    emu = await emulator_factory(ttft_s=0.1, tokens_per_s=200.0, default_max_tokens=16)
    gateway = await start_gateway(parse_config(moa_config(emu.url, ["p1", "p2"], gateway={"batch_window": 2})),
                                  probes=False)
    annotator = await start_annotator(parse_config(judge_config(judge_emulator.url, {"j1": "longest"},
                                                                mode="pointwise")), port=0, probes=False)
    yield {"gateway": gateway.address, "annotator": annotator.address}
    await gateway.stop(0)
    await annotator.stop(0)


async def test_pipeline_stage1_sigkill_resume_says_so_on_stderr_only(gateway_and_annotator, tiny_model_dir, tmp_path):
    n = 24
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Explain item {i} briefly."}) + "\n" for i in range(n)))
    out = tmp_path / "run"
    cmd = _moaa("pipeline", "run", "--prompts", str(prompts), "--out", str(out), "--until", "sft_data",
                "--gateway", gateway_and_annotator["gateway"], "--annotator", gateway_and_annotator["annotator"],
                "--target", str(tiny_model_dir), "--set", "answer_tokens=8")
    shard = out / "stage1-sft-data" / "data-00000.jsonl"
    assert await _kill_when(cmd, lambda: _count_lines(shard) >= 3), "stage 1 finished before the kill"
    partial = _ids(shard)
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(shard)
    assert len(ids) == len(set(ids)) == n and set(partial) <= set(ids)
    assert f"stage 1: MoA answers: resuming: {len(partial)} of {n} rows done, {n - len(partial)} left" in err, err
    assert "\r" not in err and f"{n}/{n}" in err and "row/s" not in stdout
    rc, stdout, err = await _run(cmd)
    assert rc == 0 and _ids(shard) == ids and "stage sft_data: done in an earlier run, skipped" in err, err


def test_training_resumed_from_a_checkpoint_says_so_and_its_rate_counts_only_new_steps(monkeypatch):
    """The trainer's "start" event with resumed=true (after the bar began): the same resuming line, and the
    steps before the checkpoint are not counted into this run's rate."""
    monkeypatch.delenv("MOAA_LOG_LEVEL", raising=False)
    log = io.StringIO()
    with StageProgress("SFT training", 0, 0, unit="step", stream=log) as bar:
        bar.resume_at(400, 500)
        assert bar.bar.initial == 400 and bar.bar.n == 400
        for step in range(401, 501):
            bar.set(step)
    lines = _lines(log)
    assert "SFT training: resuming: 400 of 500 steps done, 100 left" in lines, lines
    assert "500/500" in lines[-1]


# --- moaa eval (an OpenAI-compatible judge), killed and run again -------------------------------------------

async def test_eval_sigkill_then_resume_exactly_once_then_nothing_to_do(tmp_path, slow_annotator):
    emu, _ = slow_annotator        # its judge emulator, 0.3 s a call, as the --judge-url judge
    n = 40
    a, b, ev = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "ev"
    a.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?", "answer": "long answer " * 4}) + "\n"
                         for i in range(n)))
    b.write_text("".join(json.dumps({"id": f"q{i}", "instruction": f"Question {i}?", "output": "short"}) + "\n"
                         for i in range(n)))
    cmd = _moaa("eval", "--answers", str(a), "--baseline", str(b), "--judge-url", emu.url, "--judge-model", "longest",
                "--out", str(ev), "--bootstrap", "50")
    shard = ev / "judgments" / "data-00000.jsonl"
    assert await _kill_when(cmd, lambda: _count_lines(shard) >= 3), "eval finished before the kill"
    partial = _ids(shard)
    assert 3 <= len(partial) < n

    await _settled(emu)
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(shard)
    assert len(ids) == len(set(ids)) == n and set(partial) <= set(ids)
    assert emu.stats.requests == 2 * (n - len(partial))     # both orders of the rows left, nothing redone
    assert f"eval model vs baseline: resuming: {len(partial)} of {n} rows done, {n - len(partial)} left" in err, err
    assert "\r" not in err and "row/s" not in stdout and stdout.startswith("model vs baseline:")

    emu.reset()
    rc, stdout, err = await _run(cmd)
    assert rc == 0 and emu.stats.requests == 0 and _ids(shard) == ids, err
    assert f"eval model vs baseline: all {n} rows done in an earlier run; nothing to do" in err, err


async def test_judge_eval_progress_on_stderr_in_line_mode_and_the_table_alone_on_stdout(tmp_path, slow_annotator):
    """`moaa judge-eval` is re-run whole (a labelled set of hundreds of rows), but shows the same progress."""
    _, server = slow_annotator
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"id": f"l{i}", "prompt": "Capital of France?", "chosen": GOOD,
                                            "rejected": BAD}) + "\n" for i in range(6)))
    rc, stdout, err = await _run(_moaa("judge-eval", "--annotator", server.address, "--in", str(labelled)))
    assert rc == 0, err
    assert "(ensemble)" in stdout and "call/s" not in stdout
    assert "\r" not in err and "judge-eval: 100%" in err and "12/12" in err and "call/s" in err
    rc, stdout2, err = await _run(_moaa("judge-eval", "--annotator", server.address, "--in", str(labelled), "--quiet"))
    assert rc == 0 and stdout2 == stdout and err == ""


# --- moaa train sft|dpo: a finished run started again ------------------------------------------------------

@pytest.mark.slow
async def test_train_rerun_after_a_finished_run_loads_no_model_and_says_nothing_to_do(tmp_path, tiny_model_dir):
    """Without checkpoints (save_strategy=no) a re-run used to train again from the start; with them it re-saved
    the model and recorded a resume. Now: the same settings and data, the final model saved -> one line, exit 0.
    (A run SIGKILLed mid-training resumes from its newest checkpoint: tests/test_train_resume.py.)"""
    from tests.fixtures.trainer import FIXED_BATCH, sft_rows, write_jsonl

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    out = tmp_path / "sft"
    cmd = _moaa("train", "sft", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(out),
                "--max-steps", "2", *FIXED_BATCH, "--set", "trl.save_strategy=no")
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    def outputs():   # run_config.json is the settings guard's record, rewritten with the same content
        return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != "run_config.json"}

    weights = outputs()
    saved = json.loads(stdout.splitlines()[-1])
    assert saved["event"] == "saved" and "\r" not in err
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    assert json.loads(stdout.splitlines()[-1]) == {"event": "done_before", "out": str(out), "step": 2,
                                                   "train_loss": saved["train_loss"], "resumed_from": None}
    assert f"sft: the final model in {out} is saved (step 2): nothing to do" in err
    assert outputs() == weights and "model.safetensors" in weights   # nothing retrained, nothing rewritten


def test_a_byte_count_in_a_log_is_scaled_whole_lines_without_row_counters():
    """Extracting the packaged model (moaa/models.py fetch_gguf) goes through the one display: in a log, whole
    lines in scaled bytes, no carriage returns, no failed/skipped counters that bytes cannot have."""
    import io

    out = io.StringIO()
    with StageProgress("extract m.gguf", 98_400_000, 0, unit="B", unit_scale=True, stream=out) as bar:
        for _ in range(100):
            bar.advance(984_000)
    text = out.getvalue()
    assert "\r" not in text and "98.4M/98.4M" in text and "failed" not in text, text
    assert len(text.splitlines()) <= 3, text
