"""The pipeline at the paper's scale: stage 1 (MoA answers) and judging over fast emulated backends.

    python benchmarks/pipeline_scale.py [--rows 65000] [--quick]

Four server processes (the backend emulator, the judge emulator, a gateway with 3 proposers + 1
aggregator, an annotator with 3 pointwise judges) and the pipeline itself as a child process, exactly
as a user runs it: `moaa pipeline run --gateway ... --annotator ... --until pairs`. Every backend model
has SLOTS requests in flight (the gateway's / annotator's max_concurrency) and answers in DELAY_S, so
each stage's bound is SLOTS / DELAY_S rows/s (every row asks each of its models once).

Training is not part of this benchmark: the run folder is seeded the way the pipeline resumes, with a
finished SFT model manifest (so the sft stage is done) and a complete stage-2 samples file of 5
candidates per prompt, one shard as `moaa sample` writes it. Stages sft_data and pairs then run for real.

Per size (N/4 and N rows through both stages; the prompt file holds N / 0.8 prompts, as 20 % are held
out for eval): rows/s of each stage and its share of the bound, the pipeline's RSS while the stages run
(sampled every 0.5 s) and its peak over the whole command (its own VmHWM, read every poll until it
exits: that includes the report built after the stages), and that every id is in the output exactly once. At N, the run
is SIGKILLed at about half of stage 1 and run again: printed are the time to open the killed dataset folder
(`DatasetStore.open`, what a re-run does to find where it stopped) and the re-run's time to its first
new row, next to a fresh run's time to its first row (process start, imports, prompt loading).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from _procs import run_emulator, run_server, spawn, write_json  # benchmarks/ is on sys.path when run as a script

DELAY_S = 0.05          # each backend request
SLOTS = 16              # requests in flight per backend model
TOKENS = 8              # answer length
PROPOSERS = ["p1", "p2", "p3"]
JUDGES = {"j1": "longest", "j2": "longest+text", "j3": "keyword:water"}
CANDIDATES = 5


def _backend(url: str, served: str | None = None) -> dict:
    cfg = {"urls": [url], "max_concurrency": SLOTS, "health": {"probe_interval_s": 3600}}
    return {**cfg, "served_model": served} if served else cfg


def _gateway_config(url: str) -> dict:
    return {"backends": {m: _backend(url) for m in [*PROPOSERS, "agg"]},
            "recipes": {"moa": {"proposers": [{"model": p} for p in PROPOSERS], "aggregator": {"model": "agg"}}},
            "gateway": {"port": 0, "http_port": None}}


def _annotator_config(url: str) -> dict:
    return {"backends": {n: _backend(url, f"{pol}+delay={DELAY_S}+name={n}") for n, pol in JUDGES.items()},
            "ensembles": {"e": {"judges": [{"name": n, "model": n} for n in JUDGES], "mode": "pointwise",
                                "combine": "mean", "min_margin": 0.0}},
            "annotator": {"port": 0}}


# -- the run folder --------------------------------------------------------------------------------
def _n_prompts(rows: int, held_out: float = 0.2) -> int:
    p = int(rows / (1 - held_out))
    while p - round(p * held_out) < rows:
        p += 1
    return p


def _write_prompts(path: Path, n: int) -> None:
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"p{i:06d}", "prompt": f"Explain topic number {i} in one paragraph."}) + "\n")


def _seed(out: Path, prompts: Path) -> tuple[list[str], list[str]]:
    """A finished SFT model and a complete samples file: the run goes from stage 1 straight to judging.
    Returns the training prompts' ids (judged in stage 2) and every prompt's id (stage 1 answers the eval
    prompts too, held out to measure SFT on)."""
    from moaa.prompts import PromptStream
    from moaa.pipeline.promptset import prepare_prompts

    split = prepare_prompts(out.parent / "split.jsonl", PromptStream(prompts), eval_fraction=0.2, quick=False)
    everything, train = list(split.rows()), list(split.rows("train"))
    (out / "sft-model").mkdir(parents=True)
    (out / "sft-model" / "manifest.json").write_text(json.dumps({"final_step": 0, "note": "seeded by the benchmark"}))
    (out / "stage2-samples").mkdir()
    with (out / "stage2-samples" / "data-00000.jsonl").open("w") as fh:
        for k, r in enumerate(train):
            cands = [{"id": f"s{i}", "text": f"Answer {i} to prompt {k}: " + "water " * (i + k % 3),
                      "model": "sft-model"} for i in range(CANDIDATES)]
            fh.write(json.dumps({"id": r.id, "prompt": r.messages, "candidates": cands}) + "\n")
    return [r.id for r in train], [r.id for r in everything]


def _rows_in(folder: Path) -> int:
    """Rows written so far (cheap enough to poll: full shards count SHARD_ROWS, only the last is read)."""
    from moaa.pipeline.store import SHARD_ROWS

    shards = sorted(folder.glob("data-*.jsonl"))
    if not shards:
        return 0
    try:
        return SHARD_ROWS * (len(shards) - 1) + shards[-1].read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _ids(folder: Path, *names: str) -> list[str]:
    from moaa.jsonl import read_rows

    files = sorted(folder.glob("data-*.jsonl")) + [folder / n for n in names]
    return [row["id"] for f in files for row in read_rows(f)]


def _hwm_mib(pid: int) -> float:
    """A live process's own peak RSS since its exec (VmHWM). Not wait4's ru_maxrss: Linux carries the
    forking parent's peak across exec into it: it gave this benchmark's own peak whenever that was larger
    (at 32,000 rows the child's ru_maxrss was already 99.5 MiB before it ran a line)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0   # exited between two polls: its peak was read at the poll before


class Run:
    """One `moaa pipeline run` child: its peak RSS, its time to its first new row in a folder."""

    def __init__(self, cmd: list[str], watch: Path):
        self.watch, self.base = watch, _rows_in(watch)
        self.t0 = time.monotonic()
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.errfile)
        self.first_row_s: float | None = None
        self.err = ""
        self.stage_rss_mib = 0.0     # sampled while stages sft_data .. pairs run (not the report after them)
        self.peak_rss_mib = 0.0      # VmHWM: the child's own peak since its exec, read at every poll
        self._sampled_at = 0.0

    def poll(self) -> int:
        n = _rows_in(self.watch)
        now = time.monotonic()
        if self.first_row_s is None and n > self.base:
            self.first_row_s = now - self.t0
        self.peak_rss_mib = max(self.peak_rss_mib, _hwm_mib(self.proc.pid))
        if now - self._sampled_at >= 0.5 and not self._pairs_done():
            self._sampled_at = now
            try:
                rss = psutil.Process(self.proc.pid).memory_info().rss / 2**20
            except psutil.Error:
                rss = 0.0
            self.stage_rss_mib = max(self.stage_rss_mib, rss)
        return n

    def _pairs_done(self) -> bool:
        try:
            run = json.loads((self.watch.parent / "run.json").read_text())
        except (OSError, ValueError):
            return False
        return run.get("stages", {}).get("pairs", {}).get("status") == "done"

    def wait(self, until=None, timeout_s: float = 3600) -> tuple[int, float]:
        """Poll until exit (or until `until(rows)` is true: then SIGKILL). Returns (exit code, peak RSS MiB)."""
        deadline = time.monotonic() + timeout_s
        while True:
            n = self.poll()
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if (until is not None and until(n)) or time.monotonic() > deadline:
                os.kill(self.proc.pid, signal.SIGKILL)
                _, status = os.waitpid(self.proc.pid, 0)
                break
            time.sleep(0.02)
        self.wall_s = time.monotonic() - self.t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.errfile.seek(0)
        self.err = self.errfile.read().decode(errors="replace")
        return self.proc.returncode, self.peak_rss_mib


def _cmd(gateway: str, annotator: str, prompts: Path, out: Path, window: int | None) -> list[str]:
    return [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--prompts", str(prompts),
            "--out", str(out), "--gateway", gateway, "--annotator", annotator, "--target", "org/seeded-sft-model",
            "--ensemble", "e", "--until", "pairs", "--set", f"answer_tokens={TOKENS}",
            *(["--set", f"window={window}"] if window else [])]


def _stage_rates(out: Path, rows_of: dict[str, int]) -> dict:
    run = json.loads((out / "run.json").read_text())
    bound = SLOTS / DELAY_S
    res = {}
    for stage, rows in rows_of.items():
        s = run["stages"][stage]["seconds"]
        res[stage] = {"seconds": round(s, 1), "rows_per_s": round(rows / s, 1),
                      "share_of_bound": round(rows / s / bound, 3)}
    return res


def _check_once(out: Path, train_ids: list[str], all_ids: list[str]) -> dict:
    s1 = _ids(out / "stage1-sft-data", "skipped.jsonl")
    s2 = _ids(out / "stage2-pairs", "skipped.jsonl")
    return {"stage1_exactly_once": len(s1) == len(set(s1)) == len(set(all_ids)) and set(s1) == set(all_ids),
            "pairs_exactly_once": len(s2) == len(set(s2)) == len(set(train_ids)) and set(s2) == set(train_ids),
            "stage1_ids": len(s1), "pairs_ids": len(s2)}


def _size(gw: str, ann: str, tmp: Path, rows: int, window: int | None, kill: bool) -> dict:
    from moaa.pipeline.store import DatasetStore

    folder = tmp / f"n{rows}"
    folder.mkdir()
    prompts, out = folder / "prompts.jsonl", folder / "run"
    _write_prompts(prompts, _n_prompts(rows))
    train_ids, all_ids = _seed(out, prompts)
    rows_of = {"sft_data": len(all_ids), "pairs": len(train_ids)}
    cmd = _cmd(gw, ann, prompts, out, window)
    s1 = out / "stage1-sft-data"
    res: dict = {"rows": rows, "prompts": _n_prompts(rows)}
    if kill:
        first = Run(cmd, s1)
        rc, rss_killed = first.wait(until=lambda n: n >= rows // 2)
        res["killed_at_rows"] = _rows_in(s1)
        res["fresh_first_row_s"] = round(first.first_row_s or float("nan"), 2)
        t0 = time.monotonic()
        DatasetStore(s1, stage="sft_data", fmt="sft").open()
        res["store_open_s"] = round(time.monotonic() - t0, 2)
        rerun = Run(cmd, s1)
        rc, rss = rerun.wait()
        res["resume_first_row_s"] = round(rerun.first_row_s or float("nan"), 2)
        res["peak_rss_mib"] = round(max(rss, rss_killed), 1)
        res["stage_rss_mib"] = round(max(first.stage_rss_mib, rerun.stage_rss_mib), 1)
        run = rerun
    else:
        run = Run(cmd, s1)
        rc, rss = run.wait()
        res["peak_rss_mib"] = round(rss, 1)
        res["stage_rss_mib"] = round(run.stage_rss_mib, 1)
        res["fresh_first_row_s"] = round(run.first_row_s or float("nan"), 2)
    if rc != 0:
        raise SystemExit(f"pipeline run failed (exit {rc}):\n{run.err[-3000:]}")
    res["stages"] = _stage_rates(out, rows_of)
    if kill:  # a resumed run's stage 1 time covers only the rows left after the kill
        s = res["stages"]["sft_data"]
        left = rows_of["sft_data"] - res["killed_at_rows"]
        s.update(rows_per_s=round(left / s["seconds"], 1),
                 share_of_bound=round(left / s["seconds"] / (SLOTS / DELAY_S), 3))
    # the rest of the command's wall time: start-up, the skipped stages, the report built at the end
    res["outside_stages_s"] = round(run.wall_s - sum(v["seconds"] for v in res["stages"].values()), 1)
    res.update(_check_once(out, train_ids, all_ids))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=65000, help="rows through stage 1 and judging at the large size")
    ap.add_argument("--quick", action="store_true", help="2,000 rows (a smoke run)")
    ap.add_argument("--window", type=int, help="the pipeline's rows in flight per stream (--set window=N)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    n = 2000 if args.quick else args.rows
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still stops its servers
    emu, emu_url = spawn(run_emulator, {"record": False, "ttft_s": DELAY_S, "tokens_per_s": 100000.0,
                                                "default_max_tokens": TOKENS}, None)
    judges, judge_url = spawn(run_emulator, {"judge": True, "record": False}, None)
    gw, gw_addr = spawn(run_server, "gateway", _gateway_config(emu_url), ("address",))
    ann, ann_addr = spawn(run_server, "annotator", _annotator_config(judge_url), ("address",))
    print(f"backends: {len(PROPOSERS)} proposers + aggregator, {len(JUDGES)} judges; {SLOTS} slots x {DELAY_S} s each: "
          f"bound {SLOTS / DELAY_S:.0f} rows/s per stage (measured on a shared, loaded machine)")
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="moaa-scale-") as tmp:
            for rows, kill in ((n // 4, False), (n, True)):
                r = _size(gw_addr, ann_addr, Path(tmp), rows, args.window, kill)
                results.append(r)
                st = r["stages"]
                line = (f"{rows} rows: pipeline RSS {r['stage_rss_mib']} MiB during the stages (sampled), peak "
                        f"{r['peak_rss_mib']} MiB with the report built after them; ") + "; ".join(
                    f"{k} {v['rows_per_s']} rows/s ({v['share_of_bound']:.0%} of bound, {v['seconds']} s)"
                    for k, v in st.items())
                print(line)
                print(f"    ids exactly once: stage 1 {r['stage1_exactly_once']} ({r['stage1_ids']}), "
                      f"pairs {r['pairs_exactly_once']} ({r['pairs_ids']}); fresh run's first row after "
                      f"{r['fresh_first_row_s']} s; outside the two stages (start, report) {r['outside_stages_s']} s")
                if kill:
                    print(f"    SIGKILL at {r['killed_at_rows']} stage-1 rows: opening the killed folder "
                          f"{r['store_open_s']} s, re-run's first new row after {r['resume_first_row_s']} s")
    finally:
        for p in (ann, gw, judges, emu):
            p.terminate()
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
