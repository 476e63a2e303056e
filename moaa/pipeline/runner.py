"""`moaa pipeline run`: prompts -> MoA SFT data -> SFT -> samples -> pairs -> DPO -> eval -> report.

The run folder records each stage's status in run.json. A re-run with the same settings skips the
finished stages and resumes the unfinished one (datasets by row id, training from its newest
checkpoint); a re-run with other settings is refused (their config hash differs), so one folder never
mixes two recipes.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from moaa.client.endpoint import Endpoint
from moaa.errors import TransientError, UserError
from moaa.files import atomic_write_json, make_folder, read_json, rejected_note, utc_now
from moaa.lock import RunLock
from moaa.prompts import PromptStream

from .budget import TokenLedger
from .layout import RunLayout
from .promptset import RunPrompts, config_hash, prepare_prompts
from .stages import NEEDS_SERVICES, STAGES, StageContext, check_settings, default_settings, merge_settings
from . import training

OPERATIONAL = {"window"}  # settings that change how, not what: left out of the config hash


@dataclass
class PipelineOptions:
    out: Path = Path("moaa-run")
    prompts: str | None = None            # None: the bundled set
    mapping: dict[str, str] = field(default_factory=dict)
    skip_invalid: bool = False
    split: str | None = None
    limit: int | None = None
    gateway: str | None = None            # None: start the embedded stack
    annotator: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls: bool = False                     # TLS with the system's trusted CAs
    tls_cert: str | None = None           # client certificate and key, for services that require mutual TLS
    tls_key: str | None = None
    tls_server_name: str | None = None    # the name the services' certificates are checked against
    k8s: bool = False
    k8s_args: list[str] = field(default_factory=list)
    quick: bool = False
    token_budget: int | None = None
    target: str | None = None             # base model for SFT; None: the embedded default
    recipe: str = ""
    ensemble: str = ""
    eval_fraction: float = 0.2
    eval_judge: str = "auto"              # auto (= ensemble) | chat (the local model directly) | ensemble
    engine: str = "auto"                  # embedded model server engine
    seed: int = 0
    quiet: bool = False
    until: str | None = None              # stop after this stage (e.g. "sft_data": only build the SFT set)
    overrides: dict[str, Any] = field(default_factory=dict)  # settings overrides (tests, power users)


def run_config_hash(opts: PipelineOptions, settings: dict, prompts: RunPrompts, target: str) -> str:
    """What decides the content of the run folder (not where the services run)."""
    doc = {"settings": {k: v for k, v in settings.items() if k not in OPERATIONAL}, "target": target,
           "recipe": opts.recipe, "ensemble": opts.ensemble, "eval_fraction": opts.eval_fraction, "seed": opts.seed}
    return config_hash(doc, (r.id for r in prompts.rows()))


class RunRecord:
    """run.json: options, config hash, per-stage status and timings."""

    def __init__(self, layout: RunLayout, chash: str, opts: PipelineOptions):
        self.layout = layout
        self.data: dict[str, Any] = read_json(layout.run_manifest) or {}
        check_same_run(layout, chash, self.data.get("config_hash"))
        self.data.setdefault("started_at", utc_now())
        self.data["config_hash"] = chash
        self.data.setdefault("stages", {})
        self.data["runs"] = self.data.get("runs", 0) + 1
        self.data["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()
                                if k not in ("token",)}
        self.save()

    def status(self, stage: str) -> str | None:
        return self.data["stages"].get(stage, {}).get("status")

    def set(self, stage: str, **info: Any) -> None:
        self.data["stages"].setdefault(stage, {}).update(info)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = utc_now()
        atomic_write_json(self.layout.run_manifest, self.data)


def check_same_run(layout: RunLayout, chash: str, old: str | None) -> None:
    """A folder holds one run: other prompts or options are refused (before anything in it is replaced)."""
    if old and old != chash:
        raise UserError(f"{layout.root} holds a run with other settings (config hash {old}, now {chash}); "
                        "use another --out folder, or the same prompts and options as before")


def _recorded_hash(layout: RunLayout) -> str | None:
    try:
        return json.loads(layout.run_manifest.read_text()).get("config_hash")
    except (OSError, ValueError):
        return None


def _say(opts: PipelineOptions, text: str) -> None:
    if not opts.quiet:
        print(text, file=sys.stderr, flush=True)


def resolve_settings(opts: PipelineOptions, local: bool) -> dict[str, Any]:
    """Defaults for this kind of run, then the `--set` overrides."""
    base = default_settings(opts.quick)
    if local:  # the embedded ensemble is pairwise and asks both orders itself: one Annotate call per pair
        base["eval_both_orders"] = False
        # pairwise judging costs pairs(n) x 2 orders x judges calls per prompt: n=5 -> 40, n=3 -> 12. Measured on
        # the shared 2-core machine, n=5 made stage-2 judging alone take ~19 min; the paper's 5: --set n_samples=5
        base["n_samples"] = 3
        # SmolLM2-135M never writes "Rating: [[N]]": every 1-10 grade of the embedded run abstained (30 of 30,
        # 65 s measured). Win rates still come from the pairwise judges; grading: --set eval_grades=true
        base["eval_grades"] = False
        # each sampled eval answer per prompt costs ~35 s of sampling and ~70 s of judging on the embedded
        # default (estimated from the greedy eval's 71 s / 68 s; not yet measured): one, against the 20-minute bound
        base["eval_samples"] = 1
        # against the 20-minute bound (20 min 45 s measured at 64 tokens): 48-token samples and eval answers,
        # which also shortens every judge prompt (two answers each)
        base["sample_tokens"] = min(base["sample_tokens"], 48)
    else:  # a cluster's recipes set their models' max_tokens: the CPU-sized default would cut every answer
        base["answer_tokens"] = None
    unknown = sorted(set(opts.overrides) - set(base))
    if unknown:  # a misspelt key would otherwise be ignored without a word
        keys = ", ".join(k for k in base if k not in ("sft", "dpo"))
        raise UserError(f"--set {unknown[0]}: not a pipeline setting; the settings are {keys}, "
                        "and sft.<key> / dpo.<key> for training")
    settings = merge_settings(base, opts.overrides)
    check_settings(settings)
    settings.update({"recipe": opts.recipe, "ensemble": opts.ensemble, "eval_judge": opts.eval_judge, "seed": opts.seed})
    return settings


def check_services(opts: PipelineOptions, stages: list[str]) -> None:
    """Before anything runs: hours of SFT must not end in a missing --annotator, nor may one be ignored."""
    if opts.gateway is None and opts.annotator:
        raise UserError("--annotator is for a run against running services: give --gateway HOST:PORT too "
                        "(without --gateway the embedded stack runs its own annotator)")
    if opts.gateway and not opts.target:  # the embedded default model is the embedded stack's
        raise UserError("give --target MODEL (folder or hub id) for the model to train when using --gateway")
    if opts.gateway and not opts.annotator and "pairs" in stages:
        raise UserError("with --gateway, stage 2 (pairs) and eval need an annotator: give --annotator HOST:PORT, "
                        "or stop before it with --until samples")


def _stages_to_run(until: str | None) -> list[str]:
    names = [n for n, _ in STAGES]
    if until and until not in names:
        raise UserError(f"--until {until!r}: choose one of {', '.join(names)}")
    return names[:names.index(until) + 1] if until else names


def training_configs(settings: dict[str, Any], layout: RunLayout, base_model: str) -> dict[str, Any]:
    """The typed SFT and DPO configs of this run (stages.py gives the trainer the same inputs)."""
    for kind in ("sft", "dpo"):
        if not isinstance(settings.get(kind), dict):
            raise UserError(f"--set {kind}=...: {kind} is a section of training settings; set its keys, "
                            f"e.g. --set {kind}.max_steps=20")
    return {"sft": training.train_config("sft", settings["sft"], data=layout.sft_data / "train.jsonl",
                                         model=base_model, out=layout.sft_model),
            "dpo": training.train_config("dpo", settings["dpo"], data=layout.pairs / "train.jsonl",
                                         model=str(layout.sft_model), out=layout.dpo_model)}


async def run_pipeline(opts: PipelineOptions) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns the summary also printed at the end.

    Settings are checked before anything is written: the typed SFT/DPO configs here, then (once the folder
    is locked) against the installed TRL, before stage 1."""
    layout = RunLayout(Path(opts.out))
    local = opts.gateway is None
    settings = resolve_settings(opts, local)
    stages = _stages_to_run(opts.until)
    check_services(opts, stages)
    if opts.target and not opts.k8s:
        # a typo'd --target must not be found at SFT, after stage 1 spent its tokens (a Job's model path is
        # the cluster's, not checked here); nothing is prepared or fetched now
        from moaa.models import resolve_model

        resolve_model(opts.target, prepare_missing=False, source="--target")
    # the model is resolved later (the embedded default may be prepared on first use): a placeholder here
    training_configs(settings, layout, opts.target or "base-model")
    own = {layout.prompts.resolve(), layout.prompts.with_name(layout.prompts.name + ".new").resolve()}
    if opts.prompts and Path(opts.prompts).resolve() in own:   # the run writes its checked copy there
        raise UserError(f"--prompts {opts.prompts} is where the run keeps its checked copy of the prompts, which "
                        "would replace the file: move it, or choose another --out")
    make_folder(layout.root)
    with RunLock(layout.root) as lock:
        if lock.previous:
            _say(opts, f"run folder {layout.root}: taking over from pid {lock.previous.get('pid')} on "
                       f"{lock.previous.get('host')}, which stopped without finishing")
        return await _run_locked(opts, layout, settings, stages)


async def _run_locked(opts: PipelineOptions, layout: RunLayout, settings: dict[str, Any],
                      stages: list[str]) -> dict[str, Any]:
    from .local import LocalStack, default_target

    stream = PromptStream(opts.prompts, mapping=opts.mapping, skip_invalid=opts.skip_invalid, split=opts.split,
                          limit=opts.limit)
    # checked into a file beside the folder's own, which it replaces only once the run is known to be this
    # folder's: a refused run (other prompts or settings) leaves the folder's prompt set as it was
    staged = layout.prompts.with_name(layout.prompts.name + ".new")
    prompts = prepare_prompts(staged, stream, eval_fraction=opts.eval_fraction, quick=opts.quick)
    if prompts.invalid:
        _say(opts, f"prompts: {prompts.summary}")
    local = opts.gateway is None
    target = opts.target or default_target()  # check_services made --gateway runs name theirs
    chash = run_config_hash(opts, settings, prompts, str(target))
    try:
        check_same_run(layout, chash, _recorded_hash(layout))
    except UserError:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, layout.prompts)
    prompts = replace(prompts, path=layout.prompts)
    pending = [cfg for kind, cfg in training_configs(settings, layout, str(target)).items()
               if kind in stages and training.model_done(Path(cfg.out)) is None]
    # checked before run.json records this config (a fixed typo must not make the folder "other settings"),
    # so a folder that already records it was checked by an earlier run; the Jobs (--k8s, --k8s-arg: not in
    # the hash, so free to change between runs) are built again on every run, a matter of seconds
    if pending and (_recorded_hash(layout) != chash or opts.k8s):
        _say(opts, f"checking {', '.join(c.kind for c in pending)} settings against the installed TRL")
        await training.check_with_trl(pending, log_dir=layout.logs, k8s_args=opts.k8s_args if opts.k8s else None)
    if not local:   # before run.json records them: a typo'd name must not strand the folder for the fixed command
        from moaa.client.catalog import check_served

        await check_served(Endpoint.reached_as(opts.gateway, opts), "recipe", opts.recipe)
        if opts.annotator:   # also with --until sft_data: the folder records the ensemble now
            try:
                await check_served(Endpoint.reached_as(opts.annotator, opts), "ensemble", opts.ensemble)
            except TransientError:
                if {"pairs", "eval"} & set(stages):   # this run needs it; a later stage's is checked then
                    raise
    record = RunRecord(layout, chash, opts)
    ledger = TokenLedger(layout.usage, opts.token_budget)
    _say(opts, f"moaa pipeline: {prompts.n_train} training prompts, {prompts.n_eval} held out for eval; "
               f"run folder {layout.root} (config {chash})")
    stack = LocalStack(layout, engine=opts.engine, quiet=opts.quiet) if local else None
    summary: dict[str, Any] = {"run_folder": str(layout.root), "config_hash": chash,
                               "prompts": {"used": prompts.count, "skipped_invalid": prompts.invalid}}
    try:
        gateway = Endpoint.reached_as(stack.gateway_address if stack else opts.gateway, opts)
        annotator_addr = stack.annotator_address if stack else opts.annotator
        annotator = Endpoint.reached_as(annotator_addr, opts) if annotator_addr else None
        chat_judge = stack.chat_judge(ledger) if stack else None
        ctx = StageContext(layout=layout, ledger=ledger, config_hash=chash, prompts=prompts, base_model=str(target),
                           settings=settings, gateway=gateway, annotator=annotator, chat_judge=chat_judge,
                           k8s=opts.k8s, k8s_args=opts.k8s_args, quiet=opts.quiet)
        for name, fn in STAGES:
            failed = (record.data["stages"].get(name, {}).get("result") or {}).get("failed") or 0
            if record.status(name) == "done" and failed:  # few enough to go on, but never given up on
                _say(opts, f"stage {name}: retrying the {failed} rows that failed in an earlier run")
                trained = {"sft_data": "sft", "pairs": "dpo"}.get(name)
                if trained and record.status(trained) == "done":   # a finished model is not trained again
                    _say(opts, f"stage {name}: {trained.upper()} was trained before these rows were retried and "
                               f"does not see them; to train on them, run again with another --out")
            elif record.status(name) == "done":
                _say(opts, f"stage {name}: done in an earlier run, skipped")
                if name == opts.until:
                    break
                continue
            if stack is not None and name in NEEDS_SERVICES:
                # started once, at the first stage that calls them, and left up: an idle model server and
                # idle gateway/annotator cost training nothing measurable, while each restart costs ~45 s
                await stack.start()
            t0 = time.monotonic()
            record.set(name, status="running", started_at=utc_now())
            try:
                result = await fn(ctx)
            except BaseException as err:
                record.set(name, status="stopped" if type(err).__name__ == "BudgetExhausted" else "failed",
                           error=str(err)[:500], seconds=time.monotonic() - t0)
                raise
            record.set(name, status="done", result=result, seconds=time.monotonic() - t0, finished_at=utc_now())
            if name == opts.until:
                _say(opts, f"stopping after stage {name} (--until)")
                break
    finally:
        ledger.save()
        if stack is not None:
            await stack.stop()
    for name, _ in STAGES:   # every stage done, in this run or an earlier one (also past --until), in order
        done = record.data["stages"].get(name) or {}
        if done.get("status") == "done":
            summary[name] = done.get("result")
    from .report import build_report

    report = build_report(layout.root)
    summary["report"] = str(report)
    summary["tokens"] = ledger.to_json()
    atomic_write_json(layout.root / "summary.json", summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    from .eval.winrate import format_winrate

    lines = [f"moaa pipeline finished: run folder {summary['run_folder']}"]
    s1 = summary.get("sft_data") or {}
    pairs = summary.get("pairs") or {}
    lines.append(f"  stage 1: {s1.get('rows', 0)} SFT rows written, {s1.get('skipped', 0)} skipped"
                 + (f" ({s1['heldout_rows']} held out to measure SFT on)" if s1.get("heldout_rows") else "")
                 + (f", {s1['failed']} failed (a re-run retries them)" if s1.get("failed") else "")
                 + rejected_note(s1))
    reasons = ", ".join(f"{k} {v}" for k, v in (pairs.get("skipped_reasons") or {}).items())
    if "pairs" in summary:   # not a line of zeros for a stage not reached (--until)
        lines.append(f"  stage 2: {pairs.get('rows', 0)} preference pairs, {pairs.get('skipped', 0)} prompts skipped"
                     + (f" ({reasons})" if reasons else "")
                     + (f", {pairs['failed']} failed (a re-run retries them)" if pairs.get("failed") else "")
                     + rejected_note(pairs)
                     + (f"; {pairs['heldout_rows']} pairs held out to measure DPO on" if pairs.get("heldout_rows")
                        else ""))
    for kind in ("sft", "dpo"):
        r = summary.get(kind) or {}
        if r:
            loss = r.get("train_loss")
            lines.append(f"  {kind.upper()}: {r.get('final_step')} steps, mean train loss "
                         + (f"{loss:.4f}" if isinstance(loss, (int, float)) else "-")
                         + (f" (resumed from {r['resumed_from']})" if r.get("resumed_from") else ""))
    ev = summary.get("eval") or {}
    if ev.get("note"):
        lines.append(f"  eval: {ev['note']}")
    for w in ev.get("winrates") or []:
        lines.append(f"  {format_winrate(w)}")
    for sentence in (summary.get("training_effect") or {}).get("statements") or []:
        lines.append(f"  effect: {sentence}")
    tok = summary.get("tokens") or {}
    lines.append(f"  tokens: {tok.get('total_tokens', 0)}"
                 + "".join(f"; {s} {n}" for s, n in (tok.get("per_stage") or {}).items()))
    lines.append(f"  report: {summary.get('report')}")
    return "\n".join(lines)
