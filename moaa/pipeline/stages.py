"""The pipeline's stages. Each reads the run folder, does only what is not done yet, and writes its output.

    sft_data  prompts -> gateway GenerateBatch (MoA answers)       -> stage1-sft-data/  (TRL SFT rows; the eval
              prompts' rows are held out of train.jsonl, in heldout.jsonl, to measure SFT on)
    sft       moaa train sft                                        -> sft-model/
    samples   moaa sample --n 5 from the SFT model                  -> stage2-samples/
    pairs     annotator AnnotateStream (judge ensemble)             -> stage2-pairs/     (TRL preference rows; a
              share held out by id hash into heldout.jsonl, to measure DPO on)
    dpo       moaa train dpo                                        -> dpo-model/
    answers   per held-out prompt from base, SFT, DPO: one greedy answer and k sampled ones (fixed seeds)
                                                                    -> eval/answers-*.jsonl
    training_effect  judge-independent: held-out loss, DPO implicit reward accuracy, answers changed
                                                                    -> eval/effect.json
    eval      pairwise judging in both orders, win rates, grades     -> eval/winrates.json, grades.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Container, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moaa.client.endpoint import Endpoint
from moaa.errors import TransientError, UserError
from moaa.files import RESEND_HINT, atomic_write_text
from moaa.progress import StageProgress
from moaa.prompts import PromptRow, held_out_ids
from moaa.services.common.validation import MAX_SAMPLES, TOKENS_WIRE_BOUND

from .budget import TokenLedger
from .layout import RunLayout
from .promptset import RunPrompts
from .rpc import annotate_stream, generate_batch
from .store import REJECTED, DatasetStore
from . import training


def default_settings(quick: bool) -> dict[str, Any]:
    """Generation and training sizes: small enough for 2 CPU cores (full run < 20 min, --quick a few)."""
    steps = 4 if quick else 10    # 10 x 4 rows: one epoch over the embedded run's 40 SFT rows
    # a checkpoint of the 135M model with its optimizer state is 1.6 GB: two per training stage, not six
    save = 2 if quick else 5
    return {
        "answer_tokens": 48 if quick else 96,     # stage-1 proposer and aggregator answers
        "n_samples": 3 if quick else 5,           # stage-2 samples per prompt (the paper's N = 5)
        "eval_grades": True,                      # MT-Bench-style 1-10 grades besides the pairwise win rates
        "sample_tokens": 40 if quick else 64,
        "sample_temperature": 0.9,
        "eval_samples": 2,                        # sampled eval answers per prompt besides the greedy one
        "eval_temperature": 0.7,
        "pairs_heldout_fraction": 0.2,            # preference pairs kept out of DPO to measure it on ...
        "pairs_heldout_max": 1000,                # ... at most this many
        "allow_failures": 0.1,
        "window": 32,                             # rows in flight per gRPC stream
        "sft": {"max_steps": steps, "global_batch_size": 4, "max_length": 512, "save_steps": save,
                "learning_rate": 2e-5},
        "dpo": {"max_steps": steps, "global_batch_size": 4, "max_length": 512, "save_steps": save,
                "learning_rate": 5e-6, "beta": 0.1},
    }


class GenerationSettings(BaseModel):
    """The pipeline's own settings (`--set KEY=VALUE`, typed as JSON), checked when the run starts: a bad one
    exits 2 before stage 1 instead of failing as a TypeError after hours of SFT. Strict: "abc" or true is
    no count of tokens."""
    model_config = ConfigDict(extra="forbid", strict=True)   # a setting added without its type fails every run
    answer_tokens: int | None = Field(ge=1, lt=TOKENS_WIRE_BOUND)   # a request's max_tokens; None: the recipe's
    n_samples: int = Field(ge=2, le=MAX_SAMPLES)  # a preference pair needs two samples; `moaa sample --n`'s bound
    eval_grades: bool
    sample_tokens: int = Field(ge=1, lt=TOKENS_WIRE_BOUND)
    sample_temperature: float = Field(ge=0, le=2)
    eval_samples: int = Field(ge=0, le=MAX_SAMPLES)
    eval_temperature: float = Field(ge=0, le=2)
    pairs_heldout_fraction: float = Field(ge=0, lt=1)
    pairs_heldout_max: int = Field(ge=0)
    allow_failures: float = Field(ge=0, le=1)
    window: int = Field(ge=1)
    eval_both_orders: bool = True


def check_settings(settings: dict[str, Any]) -> None:
    """UserError naming the first bad `--set` value, its range or type."""
    try:
        # sft / dpo are checked as the typed training configs (runner.training_configs)
        GenerationSettings.model_validate({k: v for k, v in settings.items() if k not in ("sft", "dpo")})
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(x) for x in e["loc"])
        raise UserError(f"--set {key}={json.dumps(e.get('input'))}: {e['msg'].lower()}") from None


def merge_settings(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class StageContext:
    layout: RunLayout
    ledger: TokenLedger
    config_hash: str
    base_model: str                       # what SFT starts from (folder or hub id)
    settings: dict[str, Any]              # generation / training settings, part of the config hash
    prompts: RunPrompts | None = None     # streamed from the run folder by each stage that reads prompts
    gateway: Endpoint | None = None
    annotator: Endpoint | None = None
    chat_judge: Any = None                # ChatPairJudge for eval/grading where a judge backend is reachable
    k8s: bool = False
    k8s_args: list[str] = field(default_factory=list)
    quiet: bool = False
    results: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # one copy of every default: the stages read ctx.settings[k], never a fallback of their own
        self.settings = merge_settings(default_settings(False), self.settings)

    def store(self, folder: Path, stage: str, fmt: str) -> DatasetStore:
        return DatasetStore(folder, stage=stage, fmt=fmt, config_hash=self.config_hash).open()


def _finish_dataset(ctx: StageContext, store: DatasetStore, total: int, what: str) -> dict:
    """Complete the stage, or fail it while too many rows failed (they are retried on the next run).

    Failed rows (a backend or judge outage) stay failures, never skips: with at most `allow_failures`
    of them the stage completes so the run goes on, lists them as failed, and every re-run retries them."""
    pending = [rid for rid in store.failed if not store.is_done(rid)]
    if total and len(store.rejected) >= total:  # nothing came through: not a pass, whatever else holds
        store.write_manifest(complete=False)
        raise UserError(f"{what}: all {total} rows were rejected: {store.rejected_reason}; see "
                        f"{store.folder / REJECTED} ({RESEND_HINT})")
    allowed = int(ctx.settings["allow_failures"] * total)
    if pending and len(pending) > allowed:
        store.write_manifest(complete=False)
        first = next(iter(store.failed.values()))
        raise TransientError(f"{what}: {len(pending)} of {total} rows failed (first: {first}); "
                             "re-run the same command to retry them")
    return store.write_manifest(complete=True)


async def _fill_dataset(ctx: StageContext, store: DatasetStore, rows: Callable[[], Iterable], total: int, id_of,
                        call, label: str, what: str) -> dict:
    """Send the rows not yet in the store through `call(pending, progress)`; a second pass retries this
    run's failures once; the token budget is checked around each pass. Returns the finished manifest.
    `rows()` gives the stage's `total` input rows afresh for each pass, lazily: at 65,000 rows a stage
    holds only the rows in flight, never its whole input (the samples of stage 2 are a 65,000-row file)."""
    ctx.ledger.restore_stage(store.stage, store.usage)
    ctx.ledger.save()
    for _ in range(2):
        done = sum(1 for r in rows() if store.is_done(id_of(r)))  # one pass over ids, nothing kept
        if done >= total:
            break
        pending = (r for r in rows() if not store.is_done(id_of(r)))
        ctx.ledger.check(what)
        progress = StageProgress(label, total, done, ctx.ledger, quiet=ctx.quiet)
        try:
            await call(pending, progress)
        finally:
            progress.close()
            store.write_manifest(complete=False)
        ctx.ledger.check(what)
    return _finish_dataset(ctx, store, total, what)


def rejected_info(store: DatasetStore) -> dict:
    """A stage result's rejections (rows the server refused as bad input): how many, the first reason, the file."""
    if not len(store.rejected):
        return {}
    return {"rejected": len(store.rejected), "rejected_reason": store.rejected_reason,
            "rejected_file": str(store.folder / REJECTED)}


def _train_rows_file(store: DatasetStore, path: Path, keys: tuple[str, ...], keep=lambda rid: True) -> int:
    """The rows TRL reads (id + its format's fields) whose id `keep` accepts, in one file, written atomically
    and streamed (a large set is never held in memory)."""
    count = 0

    def lines():
        nonlocal count
        for r in store.iter_rows():
            if keep(r["id"]):
                count += 1
                yield json.dumps({k: r[k] for k in ("id", *keys)}, ensure_ascii=False) + "\n"

    atomic_write_text(path, lines())
    return count


def _split_rows_file(store: DatasetStore, folder: Path, keys: tuple[str, ...], held: Container[str]) -> dict:
    """train.jsonl (what training reads) and heldout.jsonl (what the training-effect step measures on)."""
    return {"train_rows": _train_rows_file(store, folder / "train.jsonl", keys, lambda rid: rid not in held),
            "heldout_rows": _train_rows_file(store, folder / "heldout.jsonl", keys, lambda rid: rid in held)}


# what to change for the most common skip reason of a stage that produced no pair
SKIP_ADVICE = {"low_margin": "lower the ensemble's min_margin or sample more answers",
               "low_agreement": "lower the ensemble's min_agreement, or check the judges (they disagree)",
               "too_many_abstentions": "check the judges' replies in the skip records (they gave no readable score: "
                                       "a template the model does not follow, or max_tokens too small), or raise "
                                       "max_abstain_fraction",
               "too_few_scored": "check the judges' replies in the skip records (they scored too few answers)",
               "too_few_candidates": "sample more answers (--set n_samples) or at a higher temperature "
                                     "(--set sample_temperature): the samples were too often the same"}


def _skip_advice(reasons: dict) -> str:
    top = max(reasons, key=reasons.get) if reasons else ""
    return SKIP_ADVICE.get(top.split(":")[0], "see the skip records in the pairs folder")


async def stage_sft_data(ctx: StageContext) -> dict:
    store = ctx.store(ctx.layout.sft_data, "sft_data", "sft")

    def call(pending, progress):
        return generate_batch(ctx.gateway, pending, store, ctx.ledger, progress, recipe=ctx.settings.get("recipe", ""),
                              max_tokens=ctx.settings["answer_tokens"], window=ctx.settings["window"])

    # the eval prompts get MoA answers too: never trained on, they measure SFT's effect on its own target
    m = await _fill_dataset(ctx, store, ctx.prompts.rows, ctx.prompts.count, lambda r: r.id, call,
                            "stage 1: MoA answers", "stage 1 (MoA answers)")
    split = _split_rows_file(store, ctx.layout.sft_data, ("messages",), ctx.prompts.eval_ids)
    return {"rows": m["rows"], "skipped": m["skipped"], "failed": m["failed"], **rejected_info(store), **split}


async def _train(ctx: StageContext, kind: str, data: Path, model: str, out: Path) -> dict:
    done = training.model_done(out)
    if done:
        return {"final_step": done.get("final_step"), "train_loss": done.get("train_loss")}
    settings = dict(ctx.settings[kind])
    progress = StageProgress(f"{kind.upper()} training", settings.get("max_steps") or 0, 0, unit="step", quiet=ctx.quiet)
    with progress:
        return await training.train(kind, data=data, model=model, out=out, settings=settings,
                                    log_path=ctx.layout.logs / f"{kind}.log", progress=progress,
                                    k8s=ctx.k8s, k8s_args=ctx.k8s_args)


async def stage_sft(ctx: StageContext) -> dict:
    return await _train(ctx, "sft", ctx.layout.sft_data / "train.jsonl", ctx.base_model, ctx.layout.sft_model)


def _prompt_file(path: Path, prompts: Iterable[PromptRow]) -> Path:
    atomic_write_text(path, (json.dumps({"id": p.id, "prompt": p.messages}, ensure_ascii=False) + "\n"
                             for p in prompts))
    return path


def _not_rejected(ctx: StageContext, split: str) -> tuple[int, Callable[[], Iterator[PromptRow]]]:
    """How many prompts of `split` stage 1's gateway did not refuse as bad input, and a reader of them. The
    refused ones (e.g. past max_prompt_chars) are never resent, as rejections are: one the local model's
    context cannot hold would fail the sampler on every re-run."""
    rejected = ctx.store(ctx.layout.sft_data, "sft_data", "sft").rejected

    def rows() -> Iterator[PromptRow]:
        return (p for p in ctx.prompts.rows(split) if p.id not in rejected)
    return sum(1 for _ in rows()), rows


async def stage_samples(ctx: StageContext) -> dict:
    folder = ctx.layout.samples
    folder.mkdir(parents=True, exist_ok=True)
    store = ctx.store(folder, "samples", "samples")   # repairs a torn last line before the sampler appends
    total, rows = _not_rejected(ctx, "train")
    if store.rows < total:
        prompts = _prompt_file(folder / "prompts.jsonl", rows())
        progress = StageProgress("stage 2: samples", total, store.rows, quiet=ctx.quiet)
        with progress:
            await training.sample(model=ctx.layout.sft_model, prompts=prompts, out=folder / "data-00000.jsonl",
                                  n=ctx.settings["n_samples"], max_new_tokens=ctx.settings["sample_tokens"],
                                  temperature=ctx.settings["sample_temperature"],
                                  log_path=ctx.layout.logs / "samples.log", progress=progress,
                                  seed=ctx.settings.get("seed", 0))
        store = ctx.store(folder, "samples", "samples")
    store.models.add("sft-model")
    m = store.write_manifest(complete=True)
    return {"rows": m["rows"]}


async def stage_pairs(ctx: StageContext) -> dict:
    if ctx.annotator is None:
        raise UserError("stage 2 needs an annotator: give --annotator HOST:PORT")
    samples = ctx.store(ctx.layout.samples, "samples", "samples")
    store = ctx.store(ctx.layout.pairs, "pairs", "preference")

    def call(pending, progress):
        return annotate_stream(ctx.annotator, pending, store, ctx.ledger, progress,
                               ensemble=ctx.settings.get("ensemble", ""), model="sft-model",
                               window=ctx.settings["window"])

    m = await _fill_dataset(ctx, store, samples.iter_rows, samples.rows, lambda r: r["id"], call,
                            "stage 2: judging", "stage 2 (judging)")
    if m["rows"] == 0:
        raise UserError(f"stage 2 produced no preference pairs ({m['skipped']} prompts skipped: "
                        f"{m['skipped_reasons']}); {_skip_advice(m['skipped_reasons'])}")
    # enough pairs to measure DPO on, not so many that a large run trains on much less
    held = held_out_ids((r["id"] for r in store.iter_rows()), ctx.settings["pairs_heldout_fraction"],
                        "pairs-heldout", cap=ctx.settings["pairs_heldout_max"], count=store.rows)
    split = _split_rows_file(store, ctx.layout.pairs, ("prompt", "chosen", "rejected"), held)
    return {"rows": m["rows"], "skipped": m["skipped"], "skipped_reasons": m["skipped_reasons"], "failed": m["failed"],
            **rejected_info(store), **split}


async def stage_dpo(ctx: StageContext) -> dict:
    return await _train(ctx, "dpo", ctx.layout.pairs / "train.jsonl", str(ctx.layout.sft_model), ctx.layout.dpo_model)


EVAL_MODELS = ("base", "sft", "dpo")
EVAL_PAIRS = [("sft", "base"), ("dpo", "base"), ("dpo", "sft")]


def _eval_decodings(ctx: StageContext) -> list[tuple[str, int, float]]:
    """(file suffix, answers per prompt, temperature): greedy, and k samples at a temperature when k > 0 (a
    small change of the model moves sampled answers before it moves the greedy one)."""
    k = int(ctx.settings["eval_samples"] or 0)
    greedy = [("", 1, 0.0)]
    return greedy + [("-sampled", k, float(ctx.settings["eval_temperature"]))] if k > 0 else greedy


async def stage_answers(ctx: StageContext) -> dict:
    """Answers to the held-out prompts from the base, SFT and DPO models (no services needed)."""
    from .eval.run import answers_from_samples

    out = ctx.layout.eval
    out.mkdir(parents=True, exist_ok=True)
    n_eval, eval_rows = _not_rejected(ctx, "eval")
    if not n_eval:
        return {"note": "no eval prompts"}
    prompts = _prompt_file(out / "prompts.jsonl", eval_rows())
    models = {"base": ctx.base_model, "sft": str(ctx.layout.sft_model), "dpo": str(ctx.layout.dpo_model)}
    counts = {}
    for suffix, n, temperature in _eval_decodings(ctx):
        for name in EVAL_MODELS:
            ans_file = out / f"answers-{name}{suffix}.jsonl"
            have = len(answers_from_samples(ans_file)) if ans_file.exists() else 0
            if have < n_eval:
                progress = StageProgress(f"eval answers: {name}{suffix}", n_eval, have, quiet=ctx.quiet)
                with progress:
                    # the same seed for every model: sample j of each model starts from the same random state
                    await training.sample(model=Path(models[name]), prompts=prompts, out=ans_file, n=n,
                                          max_new_tokens=ctx.settings["sample_tokens"], temperature=temperature,
                                          log_path=ctx.layout.logs / f"eval-{name}.log", progress=progress,
                                          seed=ctx.settings.get("seed", 0))
            counts[f"{name}{suffix}"] = len(answers_from_samples(ans_file)) * n
    return {"answers": counts}


async def stage_training_effect(ctx: StageContext) -> dict:
    """Judge-independent evidence of what SFT and DPO changed (see moaa/pipeline/effect.py)."""
    from .effect import effect_items, training_effect
    from .eval.run import all_answers_from_samples, answers_from_samples

    out = ctx.layout.eval
    out.mkdir(parents=True, exist_ok=True)
    lp_path = out / "logprobs.json"
    if not lp_path.exists():  # the child writes it atomically once every model is done
        items = effect_items(ctx.layout.sft_data / "heldout.jsonl",
                             {"heldout": ctx.layout.pairs / "heldout.jsonl", "train": ctx.layout.pairs / "train.jsonl"})
        atomic_write_text(out / "effect-items.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items))
        models = {"base": ctx.base_model, "sft": ctx.layout.sft_model, "dpo": ctx.layout.dpo_model}
        cmd = training.moaa_command("logprobs", "--items", str(out / "effect-items.jsonl"), "--out", str(lp_path),
                                    "--max-length", str(ctx.settings["sft"]["max_length"]),
                                    *[a for name, path in models.items() for a in ("--model", f"{name}={path}")])
        await training.run_child(cmd, log_path=ctx.layout.logs / "effect.log", what="training-effect log-probs")
    answers = {name: answers_from_samples(out / f"answers-{name}.jsonl") for name in EVAL_MODELS
               if (out / f"answers-{name}.jsonl").exists()}
    sampled = {name: all_answers_from_samples(out / f"answers-{name}-sampled.jsonl") for name in EVAL_MODELS
               if (out / f"answers-{name}-sampled.jsonl").exists()}
    beta = float(ctx.settings["dpo"]["beta"])
    effect = training_effect(json.loads(lp_path.read_text()), answers, beta, sampled)
    atomic_write_text(out / "effect.json", json.dumps(effect, indent=2))
    return effect


async def stage_eval(ctx: StageContext) -> dict:
    """Pairwise judging in both orders, win rates with CIs; 1-10 grades where a chat judge is reachable
    and the eval_grades setting is on."""
    from .eval.judges import AnnotatorPairJudge
    from .eval.run import (all_answers_from_samples, answers_from_samples, grade_answers, judge_pairs,
                           winrates_from_store, write_winrates)

    out = ctx.layout.eval
    if not ctx.prompts.n_eval:
        return {"note": "no eval prompts"}
    answers = {name: answers_from_samples(out / f"answers-{name}.jsonl") for name in EVAL_MODELS}
    pairs = list(EVAL_PAIRS)
    for suffix, n, _ in _eval_decodings(ctx)[1:]:  # sampled answers: "<model>:sampled", sample j against sample j
        answers.update({f"{name}:sampled": all_answers_from_samples(out / f"answers-{name}{suffix}.jsonl")
                        for name in EVAL_MODELS})
        pairs += [(f"{m}:sampled", f"{b}:sampled") for m, b in EVAL_PAIRS]
    use_chat = ctx.chat_judge is not None and ctx.settings.get("eval_judge", "auto") == "chat"
    if not use_chat and ctx.annotator is None:
        raise UserError("evaluation needs a judge: give --annotator HOST:PORT")
    judge = ctx.chat_judge if use_chat else AnnotatorPairJudge(
        ctx.annotator, ensemble=ctx.settings.get("ensemble", ""), both_orders=ctx.settings.get("eval_both_orders", True))
    store = ctx.store(out / "judgments", "eval", "generations")
    ctx.ledger.restore_stage(store.stage, store.usage)  # judgments journal their tokens, as the other stages' rows
    grades, missing = None, {}
    try:
        for model, baseline in pairs:
            ctx.ledger.check("evaluation")
            missing[(model, baseline)] = await judge_pairs(judge, model, baseline, answers[model], answers[baseline],
                                                           store, quiet=ctx.quiet, ledger=ctx.ledger)
        if ctx.chat_judge is not None and ctx.settings["eval_grades"]:
            grades = await grade_answers(ctx.chat_judge, {m: answers[m] for m in EVAL_MODELS}, out, quiet=ctx.quiet)
    finally:
        ctx.ledger.save()
        if not use_chat:
            await judge.close()
    m = _finish_dataset(ctx, store, sum(len(answers[m]) for m, _ in pairs), "evaluation")
    winrates = winrates_from_store(store, pairs, missing=missing,
                                   sampled=frozenset(p for p in pairs if p[0].endswith(":sampled")))
    write_winrates(out, winrates)
    # failed gradings count with failed judgments: the runner re-runs a stage with failures on the next run
    failed = m["failed"] + sum(g.get("failed", 0) for g in (grades or {}).values())
    result = {"winrates": winrates, "grades": grades, "judge": judge.name, "failed": failed}
    if grades is None:
        result["grades_note"] = ("1-10 grading off (eval_grades=false)" if ctx.chat_judge is not None
                                 else "1-10 grading needs a chat judge; none is reachable in this setup")
    return result


# Stages that call the gateway or the annotator (the embedded stack runs only for these).
NEEDS_SERVICES = {"sft_data", "pairs", "eval"}

STAGES = [
    ("sft_data", stage_sft_data),
    ("sft", stage_sft),
    ("samples", stage_samples),
    ("pairs", stage_pairs),
    ("dpo", stage_dpo),
    ("answers", stage_answers),
    ("training_effect", stage_training_effect),
    ("eval", stage_eval),
]
