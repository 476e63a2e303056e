"""The pipeline end to end against real local servers: gateway over the backend emulator, annotator over
the judge emulator (both emulators: no model answers), the tiny model as the target.

The pipeline itself runs as a child process (`moaa pipeline run --gateway ... --annotator ...`) so that
tests can SIGKILL it mid-stage and run it again."""
import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from moaa.services.annotator.server import start_annotator
from moaa.services.config import parse_config
from moaa.services.gateway.server import start_gateway
from tests.fixtures.annotator import judge_config
from tests.fixtures.gateway import moa_config
from tests.fixtures.kill import kill_when as _kill_when

N_PROMPTS = 20


def _prompts(path: Path, n: int = N_PROMPTS) -> Path:
    topics = ["rivers", "prime numbers", "bread", "sorting", "volcanoes", "chess", "tea", "bridges", "owls", "jazz",
              "glaciers", "compilers", "bees", "tides", "maps", "soap", "kites", "clocks", "salt", "moss", "ink"]
    rows = [{"instruction": f"Explain {topics[i % len(topics)]} in one paragraph (variant {i})."} for i in range(n)]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "Tell me a fact about the moon."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
async def services(emulator_factory, judge_emulator):
    """A gateway (3 proposers + aggregator on a slowish emulator) and an annotator (3 judges)."""
    emu = await emulator_factory(ttft_s=0.05, tokens_per_s=200.0, default_max_tokens=24)
    gw_cfg = moa_config(emu.url, ["p1", "p2", "p3"], gateway={"batch_window": 2})
    gateway = await start_gateway(parse_config(gw_cfg), probes=False)
    ann_cfg = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest+text", "j3": "longest"},
                           mode="pointwise", combine="mean", min_margin=0.0)
    annotator = await start_annotator(parse_config(ann_cfg), port=0, probes=False)
    yield {"gateway": gateway.address, "annotator": annotator.address}
    await gateway.stop(0)
    await annotator.stop(0)


def _cmd(services, prompts, out, target, *extra):
    return [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--prompts", str(prompts),
            "--out", str(out), "--gateway", services["gateway"], "--annotator", services["annotator"],
            "--target", str(target), "--set", "answer_tokens=16", "--set", "sample_tokens=12", *extra]


async def _run(cmd, timeout=300):
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def _ids(folder: Path) -> list[str]:
    return [json.loads(line)["id"] for shard in sorted(folder.glob("data-*.jsonl"))
            for line in shard.read_text().splitlines() if line.strip()]


async def test_sigkill_mid_stage1_then_resume_exactly_once(services, tiny_model_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "sft_data")
    shard = out / "stage1-sft-data" / "data-00000.jsonl"
    killed = await _kill_when(cmd, lambda: shard.exists() and shard.read_text().count("\n") >= 4)
    assert killed, "stage 1 finished before the kill"
    partial = _ids(out / "stage1-sft-data")
    assert 4 <= len(partial) < 21
    run = json.loads((out / "run.json").read_text())
    assert run["stages"]["sft_data"]["status"] == "running"       # the kill left it unfinished
    rc, stdout, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == 21        # 21 prompts: 17 to train on, the 4 eval prompts' answers held out
    assert set(partial) <= set(ids)
    manifest = json.loads((out / "stage1-sft-data" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 21 and manifest["models"] == ["agg", "p1", "p2", "p3"]
    train, held = ([json.loads(x)["id"] for x in (out / "stage1-sft-data" / f).read_text().splitlines()]
                   for f in ("train.jsonl", "heldout.jsonl"))
    assert len(train) == 17 and len(held) == 4 and set(train) | set(held) == set(ids)
    assert json.loads((out / "run.json").read_text())["stages"]["sft_data"]["result"]["heldout_rows"] == 4
    row = json.loads(shard.read_text().splitlines()[0])
    assert row["messages"][-1]["role"] == "assistant" and row["moa"]["aggregator"] == "agg"
    usage = json.loads((out / "usage.json").read_text())
    assert usage["per_stage"]["sft_data"] > 0 and set(usage["stages"]["sft_data"]) == {"agg", "p1", "p2", "p3"}
    # a third run has nothing to do
    rc, _, err = await _run(cmd)
    assert rc == 0 and _ids(out / "stage1-sft-data") == ids


async def test_token_budget_stops_cleanly_and_resumes(services, tiny_model_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "sft_data")
    cmd += ["--set", "window=2"]
    rc, _, err = await _run(cmd + ["--token-budget", "300"])
    assert rc == 3, err
    assert "token budget of 300 reached" in err and len(err.strip().splitlines()) == 1
    first = _ids(out / "stage1-sft-data")
    assert 0 < len(first) < 21
    rc, _, err = await _run(cmd + ["--token-budget", "1000000"])
    assert rc == 0, err
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == 21


async def test_other_settings_in_same_folder_are_refused(services, tiny_model_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    rc, _, err = await _run(_cmd(services, prompts, out, tiny_model_dir, "--until", "sft_data"))
    assert rc == 0, err
    rc, _, err = await _run(_cmd(services, prompts, out, tiny_model_dir, "--until", "sft_data",
                                 "--set", "answer_tokens=17"))
    assert rc == 2 and "other settings" in err and len(err.strip().splitlines()) == 1
    # a refused run with other prompts leaves the folder's checked prompt set as it was
    checked = (out / "prompts.jsonl").read_text()
    rc, _, err = await _run(_cmd(services, _prompts(tmp_path / "other.jsonl", n=3), out, tiny_model_dir,
                                 "--until", "sft_data"))
    assert rc == 2 and "other settings" in err and (out / "prompts.jsonl").read_text() == checked
    assert not (out / "prompts.jsonl.new").exists()


def _offline_cmd(out: Path, *sets: str) -> list[str]:
    """A run whose settings are refused before it would call anything (the addresses are never dialled)."""
    return [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--out", str(out), "--gateway",
            "127.0.0.1:9", "--annotator", "127.0.0.1:9", "--target", "org/some-model",
            *[x for item in sets for x in ("--set", item)]]


async def test_bad_sft_value_exits_2_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    rc, _, err = await _run(_offline_cmd(out, "sft.learning_rate=abc"), timeout=60)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "bad sft settings (--set sft.KEY=VALUE): learning_rate: Input should be a valid number" in err
    assert not out.exists()                                    # no run folder, so no stage folder either
    rc, _, err = await _run(_offline_cmd(out, "dpo.packing=true"), timeout=60)   # packing is an SFT field
    assert rc == 2 and "packing is not a moaa DPOSettings field" in err and not out.exists()
    rc, _, err = await _run(_offline_cmd(out, "n_sample=5"), timeout=60)         # misspelt: never silently ignored
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--set n_sample: not a pipeline setting" in err and "n_samples" in err and not out.exists()
    rc, _, err = await _run(_offline_cmd(out, "n_samples=abc"), timeout=60)      # typed: not a TypeError after SFT
    assert rc == 2 and err.strip() == 'moaa: error: --set n_samples="abc": input should be a valid integer', err
    assert not out.exists()


@pytest.mark.parametrize("item, says", [
    ("window=abc", 'window="abc": input should be a valid integer'),
    ("answer_tokens=-5", "answer_tokens=-5: input should be greater than or equal to 1"),
    ("n_samples=1", "n_samples=1: input should be greater than or equal to 2"),
    ("eval_grades=1", "eval_grades=1: input should be a valid boolean"),
    ("allow_failures=2", "allow_failures=2: input should be less than or equal to 1"),
    ("sample_temperature=true", "sample_temperature=true: input should be a valid number"),
    ("pairs_heldout_fraction=1", "pairs_heldout_fraction=1: input should be less than 1"),
    # past the wire's uint32 max_tokens (was a CancelledError traceback from deep in grpc, after stage 1 began)
    ("answer_tokens=99999999999", "answer_tokens=99999999999: input should be less than 4294967296"),
    ("n_samples=100", "n_samples=100: input should be less than or equal to 64"),
])
def test_pipeline_settings_are_typed_and_ranged_before_anything_runs(item, says):
    from moaa.errors import UserError
    from moaa.overrides import apply_sets
    from moaa.pipeline.runner import PipelineOptions, resolve_settings

    opts = PipelineOptions(gateway="127.0.0.1:9", overrides=apply_sets({}, [item]))
    with pytest.raises(UserError) as err:
        resolve_settings(opts, local=False)
    assert str(err.value) == f"--set {says}"
    assert resolve_settings(PipelineOptions(overrides=apply_sets({}, ["sample_temperature=0", "window=1"])),
                            local=True)["window"] == 1


async def test_a_target_that_is_no_model_exits_2_before_stage_1(tmp_path):
    """A typo'd --target was found at SFT, after stage 1 had spent its tokens, and the fixed command was then
    refused as other settings: now it is refused before the run folder exists (not with --k8s, whose Jobs
    see the cluster's paths)."""
    out = tmp_path / "run"
    cmd = _offline_cmd(out)
    cmd[cmd.index("--target") + 1] = str(tmp_path / "no_such_model")
    rc, _, err = await _run(cmd, timeout=60)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--target" in err and "no_such_model" in err, err
    assert not out.exists()


async def test_gateway_without_annotator_or_annotator_without_gateway_exits_2_at_once(tmp_path):
    """Checked before anything runs: not after stage 1, SFT and sampling have spent their hours."""
    out = tmp_path / "run"
    cmd = [x for x in _offline_cmd(out) if x not in ("--annotator",)]
    cmd.remove("127.0.0.1:9")                       # the annotator's address (the gateway's stays)
    rc, _, err = await _run(cmd, timeout=60)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "give --annotator HOST:PORT" in err, err
    assert not out.exists()
    rc, _, err = await _run([sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--out", str(out),
                             "--annotator", "127.0.0.1:9"], timeout=60)
    assert rc == 2 and "give --gateway HOST:PORT too" in err and not out.exists(), err
    cmd = _offline_cmd(out)                          # the model to train: the embedded default is not for --gateway
    del cmd[cmd.index("--target"):cmd.index("--target") + 2]
    rc, _, err = await _run(cmd, timeout=60)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "give --target MODEL" in err, err
    assert not out.exists()


async def test_out_that_is_a_file_or_report_of_a_file_exits_2(tmp_path):
    out = tmp_path / "run.jsonl"
    out.write_text("{}\n")
    rc, _, err = await _run(_offline_cmd(out), timeout=60)
    assert rc == 2 and err.strip() == f"moaa: error: --out {out} is a file; give a folder (new, or one to resume)"
    rc, _, err = await _run([sys.executable, "-m", "moaa.cli.main", "pipeline", "report", str(out)], timeout=60)
    assert rc == 2 and err.strip() == f"moaa: error: run folder {out} is not a folder"
    assert out.read_text() == "{}\n"


async def test_trl_values_are_checked_by_the_trainer_before_stage_1(tmp_path):
    """The TRL layer: the trainer's own `moaa train KIND --check` gets the exact argv of the stage and refuses a
    bad `trl.*` value; the same check shows `sft.trl.save_strategy=no` reaching TRL's SFTConfig as "no"."""
    out = tmp_path / "run"
    rc, _, err = await _run(_offline_cmd(out, "sft.trl.save_strategy=no", "dpo.trl.max_grad_norm=abc"), timeout=180)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "checking --set dpo.* against the installed TRL failed (exit 2)" in err
    assert "trl.max_grad_norm='abc': Input should be a valid number" in err
    # no stage ran, and no config hash was recorded: the fixed command may use the same folder
    assert not (out / "stage1-sft-data").exists() and not (out / "run.json").exists()
    checked = [json.loads(line) for line in (out / "logs" / "sft-check.log").read_text().splitlines()
               if line.startswith("{")]
    assert checked == [{"event": "config_ok", "kind": "sft", "trl": {"save_strategy": "no"}}]


async def test_k8s_jobs_are_checked_before_stage_1(tmp_path):
    """With --k8s, each stage's Job is built (`moaa train submit ... --dry-run`, the stage's exact argv and
    --k8s-arg) before stage 1: an --out the Jobs cannot write to stops the run now, not hours later."""
    out = tmp_path / "run"
    rc, _, err = await _run([*_offline_cmd(out), "--k8s"], timeout=180)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "checking the SFT Job" in err and f"--out {out}/" in err and "checkpoints volume" in err
    assert not (out / "stage1-sft-data").exists() and not (out / "run.json").exists()
    rc, _, err = await _run(_offline_cmd(out), timeout=180)   # nothing answers: found before run.json is written
    assert rc == 75 and "gateway ListModels at 127.0.0.1:9: UNAVAILABLE" in err and not (out / "run.json").exists(), err
    rc, _, err = await _run([*_offline_cmd(tmp_path / "named"), "--k8s", "--k8s-arg=--name=uf"], timeout=60)
    assert rc == 2 and "--k8s-arg=--name=uf: the pipeline names each stage's Job itself" in err, err


async def test_sft_trl_save_strategy_no_reaches_the_trainer(services, tiny_model_dir, tmp_path):
    """`--set sft.trl.save_strategy=no` (YAML would read False) trains with TRL's save_strategy "no"."""
    prompts = _prompts(tmp_path / "p.jsonl", n=6)
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "sft", "--set", "sft.max_steps=2",
               "--set", "sft.global_batch_size=2", "--set", "sft.trl.save_strategy=no")
    rc, _, err = await _run(cmd, timeout=600)
    assert rc == 0, err
    manifest = json.loads((out / "sft-model" / "manifest.json").read_text())
    assert manifest["trl_args"]["save_strategy"] == "no" and manifest["config"]["trl"] == {"save_strategy": "no"}
    assert not list((out / "sft-model").glob("checkpoint-*"))
    assert 'trl={"save_strategy":"no"}' in (out / "logs" / "sft.log").read_text().splitlines()[0]


async def test_one_run_per_folder_and_a_killed_runs_lock_is_taken_over(services, tiny_model_dir, tmp_path):
    import socket

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "sft_data")
    lock = out / ".moaa-run.lock"
    holder = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.DEVNULL,
                                                  stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(3000):
            if lock.exists() and f'"pid": {holder.pid}' in lock.read_text():
                break
            await asyncio.sleep(0.01)
        os.kill(holder.pid, signal.SIGSTOP)      # holds the folder for as long as the test needs
        rc, _, err = await _run(cmd, timeout=60)
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is in use by another moaa pipeline run (pid {holder.pid} on host {socket.gethostname()}" in err
        os.kill(holder.pid, signal.SIGKILL)      # dies holding it: the kernel drops the flock
        await holder.wait()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    assert f'"pid": {holder.pid}' in lock.read_text()       # the dead run's record is still there
    rc, _, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == 21        # 17 to train on + the 4 eval prompts held out
    assert lock.read_text() == ""                             # released at the end


@pytest.mark.slow
async def test_sigkill_mid_sft_training_then_resume_from_checkpoint(services, tiny_model_dir, tmp_path):
    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "sft", "--set", "sft.max_steps=20",
               "--set", "sft.save_steps=4", "--set", "sft.global_batch_size=2")
    sft = out / "sft-model"
    killed = await _kill_when(cmd, lambda: any(sft.glob("checkpoint-*/trainer_state.json")), timeout=240)
    assert killed, "training finished before the kill"
    assert not (sft / "manifest.json").exists()
    assert json.loads((out / "run.json").read_text())["stages"]["sft"]["status"] == "running"
    rc, stdout, err = await _run([a for a in cmd if a != "--quiet"])   # with progress: it says it resumed
    assert rc == 0, err
    result = json.loads((out / "run.json").read_text())["stages"]["sft"]["result"]
    assert result["final_step"] == 20
    step = int(result["resumed_from"].rsplit("-", 1)[1])
    assert f"SFT training: resuming: {step} of 20 steps done, {20 - step} left" in err, err
    assert "\r" not in err and "20/20" in err
    assert result["resumed_from"] and "checkpoint-" in result["resumed_from"]   # continued, not restarted
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["resumed_from"] == result["resumed_from"]
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == 21
    assert "SFT: 20 steps" in stdout and "resumed from" in stdout


@pytest.mark.slow
async def test_sigkill_mid_samples_leaves_no_process_and_resumes_exactly_once(services, tiny_model_dir, tmp_path):
    """SIGKILL while the sampler child (`moaa sample`) is appending rows: the sampler dies with the pipeline,
    the re-run finishes the samples with every id once, and the token ledger equals the rows' journaled usage.
    Sampling is local (the SFT model in the sampler process): it calls no service and journals no tokens."""
    from moaa.pipeline.budget import TokenLedger
    from moaa.pipeline.store import DatasetStore
    from tests.fixtures.kill import alive, wait_all_gone

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "samples", "--set", "sft.max_steps=2",
               "--set", "sft.global_batch_size=2", "--set", "sft.trl.save_strategy=no")
    shard = out / "stage2-samples" / "data-00000.jsonl"
    tree: dict = {}
    killed = await _kill_when(cmd, lambda: shard.exists() and 1 <= shard.read_text().count("\n") < 17,
                              timeout=300, tree=tree)
    assert killed, "the samples stage finished before the kill"
    assert any(argv[3:4] == ["sample"] for argv in tree.values()), list(tree.values())  # python -m moaa.cli.main sample
    partial = _ids(out / "stage2-samples")
    assert 1 <= len(partial) < 17 and len(partial) == len(set(partial))
    left = await asyncio.to_thread(wait_all_gone, list(tree), 5.0)      # a few seconds later: nothing of the run
    assert not left, [(p.pid, tree[p][:5]) for p in alive(left)]
    # an orphaned sampler may finish the tiny model's rows within those seconds: it shows as rows written after
    assert _ids(out / "stage2-samples") == partial, "a process of the killed run kept writing samples"
    assert json.loads((out / "run.json").read_text())["stages"]["samples"]["status"] == "running"
    rc, _, err = await _run(cmd)
    assert rc == 0, err
    ids = _ids(out / "stage2-samples")
    assert len(ids) == len(set(ids)) == 17 and set(partial) <= set(ids)
    manifest = json.loads((out / "stage2-samples" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 17
    assert json.loads((out / "run.json").read_text())["stages"]["samples"]["status"] == "done"
    # the ledger: stage 1's tokens equal the usage journaled with its rows; sampling spent none
    ledger = TokenLedger(out / "usage.json")
    stage1 = DatasetStore(out / "stage1-sft-data", stage="sft_data", fmt="sft").open()
    journaled = sum(u["prompt_tokens"] + u["completion_tokens"] for u in stage1.usage.values())
    assert journaled > 0 and ledger.stage_total("sft_data") == journaled
    assert ledger.stage_total("samples") == 0 and ledger.total == journaled
    samples = DatasetStore(out / "stage2-samples", stage="samples", fmt="samples").open()
    assert samples.usage == {}


@pytest.mark.slow
async def test_whole_pipeline_on_emulators_and_tiny_model(services, tiny_model_dir, tmp_path):
    """Every stage, in one command: SFT data, SFT, samples, pairs, DPO, answers, eval, report. One prompt is
    past the gateway's max_prompt_chars: rejected by stage 1, and never sent to the local models after it (the
    sampler failed on it at every re-run)."""
    prompts = _prompts(tmp_path / "p.jsonl")
    with prompts.open("a") as fh:
        fh.write(json.dumps({"instruction": "Summarise: " + "word " * 41000}) + "\n")
    out = tmp_path / "run"
    cmd = _cmd(services, prompts, out, tiny_model_dir, "--set", "sft.max_steps=4", "--set", "dpo.max_steps=4",
               "--set", "sft.save_steps=2", "--set", "dpo.save_steps=2")
    rc, stdout, err = await _run(cmd, timeout=900)
    assert rc == 0, err
    run = json.loads((out / "run.json").read_text())
    assert [s for s, v in run["stages"].items() if v["status"] == "done"] == \
        ["sft_data", "sft", "samples", "pairs", "dpo", "answers", "training_effect", "eval"]
    for folder, n in (("stage1-sft-data", 21), ("stage2-samples", 17)):
        ids = _ids(out / folder)
        assert len(ids) == len(set(ids)) == n, folder
    (refused,) = [json.loads(x) for x in (out / "stage1-sft-data" / "rejected.jsonl").read_text().splitlines()]
    assert "max_prompt_chars" in refused["reason"] and refused["id"] not in _ids(out / "stage2-samples")
    assert "1 prompts rejected" in stdout
    pair_ids = _ids(out / "stage2-pairs")
    skipped = [json.loads(x)["id"] for x in (out / "stage2-pairs" / "skipped.jsonl").read_text().splitlines()] \
        if (out / "stage2-pairs" / "skipped.jsonl").exists() else []
    assert sorted(pair_ids + skipped) == sorted(_ids(out / "stage2-samples"))   # each id exactly once
    assert len(pair_ids) >= 1
    winrates = json.loads((out / "eval" / "winrates.json").read_text())
    greedy = [("sft", "base"), ("dpo", "base"), ("dpo", "sft")]
    assert [(w["model"], w["baseline"]) for w in winrates] == greedy + [(f"{m}:sampled", f"{b}:sampled") for m, b in greedy]
    assert [w["n"] for w in winrates] == [4] * 3 + [8] * 3          # 2 sampled answers per eval prompt
    summary = json.loads((out / "summary.json").read_text())
    effect = summary["training_effect"]
    assert {"sft_heldout_loss", "dpo_reward_accuracy", "dpo_reward_margin", "answers_changed"} <= set(effect)
    loss = effect["sft_heldout_loss"]
    assert loss["rows"] == 4 and loss["base"] > 0 and loss["sft"] > 0
    acc = effect["dpo_reward_accuracy"]
    assert acc["heldout"]["n"] + acc["train"]["n"] == len(pair_ids) and acc["train"]["sft"] == 0.5
    assert effect["answers_changed"]["dpo_vs_sft"]["n"] == 4 and effect["statements"]
    assert "## Did training change the model?" in (out / "report" / "report.md").read_text()
    assert "effect: " in stdout
    report = (out / "report" / "report.md").read_text()
    assert "## Evaluation" in report and "## Training" in report and (out / "report" / "winrates.png").exists()
    assert "moaa pipeline finished" in stdout and "dpo vs base: too few prompts to tell (" in stdout
    # re-run: every stage is skipped, nothing changes
    rc, stdout2, err = await _run(cmd, timeout=300)
    assert rc == 0, err
    again = json.loads((out / "run.json").read_text())
    assert again["runs"] == 2 and again["stages"] == run["stages"] and _ids(out / "stage2-pairs") == pair_ids
    assert stdout2 == stdout and json.loads((out / "summary.json").read_text()) == summary   # nothing recomputed


def _play_training_jobs(emu, model_dir: Path, stop: "threading.Event"):
    """Plays the cluster for `--k8s`: for each training Job the pipeline creates (on an EMULATED API server,
    kmock), writes what the Job would leave on the shared volume (a model and its manifest in --out), adds a
    pod with a JSON progress log, and marks the Job Complete."""
    import shutil
    import threading
    import time

    from kubernetes import client

    from tests.fixtures.trainer import PodLog

    api = emu.client()
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    handled: list[str] = []
    argvs: dict[str, list[str]] = {}

    def run():
        while not stop.is_set():
            for job in batch.list_namespaced_job("moaa").items:
                name = job.metadata.name
                if name in handled:
                    continue
                handled.append(name)
                c = job.spec.template.spec.containers[0]
                argv = list(c.command or []) + list(c.args or [])
                argvs[name] = argv
                out = Path(argv[argv.index("--out") + 1])
                shutil.copytree(model_dir, out, dirs_exist_ok=True)
                (out / "metrics.jsonl").write_text(json.dumps({"event": "log", "step": 1, "total": 1, "loss": 1.0}) + "\n")
                (out / "manifest.json").write_text(json.dumps({"final_step": 1, "train_loss": 1.0}))
                pod = f"{name}-x1"
                emu.serve_log("moaa", pod, PodLog(json.dumps({"event": "log", "step": 1, "total": 1, "loss": 1.0})))
                core.create_namespaced_pod("moaa", {"apiVersion": "v1", "kind": "Pod", "metadata": {
                    "name": pod, "namespace": "moaa", "labels": {"job-name": name}},
                    "spec": {"containers": [{"name": "trainer", "image": "x"}], "restartPolicy": "Never"},
                    "status": {"phase": "Succeeded", "containerStatuses": [{
                        "name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 0}}}]}})
                batch.patch_namespaced_job_status(name, "moaa", {"status": {
                    "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
            time.sleep(0.1)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return handled, argvs


@pytest.mark.slow
async def test_k8s_training_jobs_are_submitted_followed_and_continued(services, tiny_model_dir, kube_api, tmp_path):
    import threading

    prompts = _prompts(tmp_path / "p.jsonl")
    out = tmp_path / "run"
    stop = threading.Event()
    jobs, argvs = _play_training_jobs(kube_api, Path(tiny_model_dir), stop)
    job_settings = tmp_path / "job.yaml"  # the Jobs mount the checkpoints volume where --out is here
    job_settings.write_text(f"checkpoints_path: {tmp_path}\n")
    try:
        cmd = _cmd(services, prompts, out, tiny_model_dir, "--until", "dpo", "--k8s", "--set", "sft.trl.save_strategy=no",
                   "--set", "dpo.beta=0.05", f"--k8s-arg=--api-server={kube_api.url}", "--k8s-arg=--poll-interval=0.1",
                   f"--k8s-arg=--job-settings={job_settings}")
        rc, stdout, err = await _run(cmd, timeout=600)
    finally:
        stop.set()
    assert rc == 0, err
    assert len(jobs) == 2 and jobs[0].startswith("moaa-sft") and jobs[1].startswith("moaa-dpo")
    # the Jobs run the typed configs the pipeline built at start, through the one serialiser (cli_args)
    from moaa.cli.main import build_parser
    from moaa.cli.train import _config_from_args
    from moaa.pipeline.layout import RunLayout
    from moaa.pipeline.runner import PipelineOptions, resolve_settings, training_configs

    opts = PipelineOptions(gateway="g", overrides={"answer_tokens": 16, "sample_tokens": 12,
                                                   "sft": {"trl": {"save_strategy": "no"}}, "dpo": {"beta": 0.05}})
    expected = training_configs(resolve_settings(opts, local=False), RunLayout(out), str(tiny_model_dir))
    for name, kind in zip(jobs, ("sft", "dpo")):
        got = _config_from_args(kind, build_parser().parse_args(argvs[name][1:]))
        assert got == expected[kind], kind
    assert expected["sft"].trl == {"save_strategy": "no"} and expected["dpo"].beta == 0.05
    run = json.loads((out / "run.json").read_text())
    assert all(run["stages"][s]["status"] == "done" for s in ("sft_data", "sft", "samples", "pairs", "dpo"))
    log = (out / "logs" / "sft.log").read_text()
    assert "train submit sft" in log and "job_complete" in log


async def test_gateway_killed_and_back_mid_stage1_costs_no_row(emulator_factory, tmp_path):
    """`moaa gateway serve` SIGKILLed mid-stream and back on its port within the client's retry bound: the
    stream is retried (the rows without a result resent), the run finishes, every id once, and the dead
    call leaves no error behind (its request feed is stopped, not left waiting)."""
    import socket

    import yaml

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    emu = await emulator_factory(ttft_s=0.05, tokens_per_s=200.0, default_max_tokens=24)
    cfg = moa_config(emu.url, ["p1", "p2", "p3"], gateway={"port": port, "http_port": None, "batch_window": 4})
    (tmp_path / "moaa.yaml").write_text(yaml.safe_dump(cfg))
    gw = await asyncio.create_subprocess_exec(sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config",
                                              str(tmp_path / "moaa.yaml"), stdout=asyncio.subprocess.DEVNULL,
                                              stderr=asyncio.subprocess.DEVNULL)
    prompts, out = _prompts(tmp_path / "prompts.jsonl", 60), tmp_path / "run"
    cmd = [sys.executable, "-m", "moaa.cli.main", "pipeline", "run", "--quiet", "--prompts", str(prompts),
           "--out", str(out), "--gateway", f"127.0.0.1:{port}", "--annotator", "127.0.0.1:9", "--target", "org/m",
           "--until", "sft_data", "--set", "answer_tokens=16"]
    back = None
    try:
        import grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await asyncio.wait_for(ch.channel_ready(), 60)
        run = asyncio.create_task(_run(cmd, timeout=120))
        data = out / "stage1-sft-data"
        for _ in range(3000):
            if len(_ids(data)) >= 8:
                break
            await asyncio.sleep(0.01)
        gw.kill()
        await gw.wait()
        back = await start_gateway(parse_config(cfg), probes=False)
        rc, _, err = await run
    finally:
        if gw.returncode is None:
            gw.kill()
            await gw.wait()
        if back is not None:
            await back.stop(0)
    assert rc == 0 and err == "", err
    ids = _ids(out / "stage1-sft-data")
    assert len(ids) == len(set(ids)) == 61


def test_with_a_gateway_the_recipes_own_max_tokens_apply():
    """The embedded stack's CPU-sized answer_tokens (96) would cut every answer of a cluster's recipe: with
    --gateway no max_tokens is sent unless --set answer_tokens asks for one."""
    from moaa.client.generate import generate_request
    from moaa.pipeline.runner import PipelineOptions, resolve_settings

    opts = PipelineOptions(out=Path("x"), gateway="gw:50051", annotator="ann:50052", target="org/m")
    assert resolve_settings(opts, local=False)["answer_tokens"] is None
    req = generate_request([{"role": "user", "content": "hi"}], max_tokens=None)
    assert not req.HasField("aggregator_sampling") and not req.HasField("proposer_sampling")
    assert resolve_settings(opts, local=True)["answer_tokens"] == 96
    opts.overrides = {"answer_tokens": 300}
    assert resolve_settings(opts, local=False)["answer_tokens"] == 300


async def test_a_prompt_file_where_the_run_keeps_its_copy_is_refused_not_replaced(tmp_path):
    """`--out .` with the user's prompts.jsonl beside: the run would replace it with its converted copy."""
    prompts = _prompts(tmp_path / "prompts.jsonl")
    before = prompts.read_text()
    cmd = [*_offline_cmd(tmp_path), "--prompts", str(prompts)]
    rc, _, err = await _run(cmd, timeout=60)
    assert rc == 2 and "is where the run keeps its checked copy of the prompts" in err, err
    assert prompts.read_text() == before


async def test_a_folder_run_without_k8s_is_checked_when_resumed_with_it(services, tmp_path):
    """--k8s and --k8s-arg are not in the folder's recorded settings, so the Jobs are built again on every
    --k8s run: a folder run first without --k8s is checked when resumed with it, before anything else runs."""
    prompts, out = _prompts(tmp_path / "p.jsonl", n=3), tmp_path / "run"
    rc, _, err = await _run(_cmd(services, prompts, out, "org/some-model", "--until", "sft_data"), timeout=300)
    assert rc == 0 and (out / "run.json").exists(), err
    rc, _, err = await _run(_cmd(services, prompts, out, "org/some-model", "--until", "sft", "--k8s"), timeout=300)
    assert rc == 2 and "checking the SFT Job" in err and "checkpoints volume" in err, err


async def test_recipe_and_ensemble_names_are_checked_before_anything_runs(services, tmp_path):
    """A typo'd --recipe or --ensemble was found at its stage (--ensemble: after stage 1 and SFT), and the
    fixed command was then refused as other settings: now exit 2 before run.json records it."""
    prompts, out = _prompts(tmp_path / "p.jsonl", n=3), tmp_path / "run"
    # the ensemble also with --until sft_data: the folder records it now, for the stage 2 of a later run
    for flags, message in ((["--recipe=mao"], "--recipe 'mao': the gateway at "),
                           (["--ensemble=e-typo", "--until", "sft_data"], "--ensemble 'e-typo': the annotator at ")):
        rc, _, err = await _run(_cmd(services, prompts, out, "org/some-model", *flags), timeout=120)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (out / "run.json").exists() and not (out / "stage1-sft-data").exists()
    assert "serves the ensembles e" in err


async def test_a_gateway_that_does_not_say_its_default_recipe_is_not_refused():
    """A gateway from before ListModels' default_recipe leaves the field unset: no false "no default recipe"
    (a rolling upgrade); a gateway that says it has none ("") is refused before anything runs."""
    import grpc

    from moaa.client.catalog import check_served
    from moaa.client.endpoint import Endpoint
    from moaa.errors import UserError
    from moaa.v1 import gateway_pb2, gateway_pb2_grpc

    answer = gateway_pb2.ListModelsResponse(recipes=[gateway_pb2.RecipeInfo(name="a"), gateway_pb2.RecipeInfo(name="b")])

    class OldGateway(gateway_pb2_grpc.MoAGatewayServicer):
        async def ListModels(self, request, context):
            return answer

    server = grpc.aio.server()
    gateway_pb2_grpc.add_MoAGatewayServicer_to_server(OldGateway(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        ep = Endpoint(f"127.0.0.1:{port}")
        await check_served(ep, "recipe", "")
        answer.default_recipe = ""
        with pytest.raises(UserError, match="has no default recipe \\(recipes: a, b\\): name one with --recipe"):
            await check_served(ep, "recipe", "")
    finally:
        await server.stop(0)
