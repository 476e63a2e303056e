"""`moaa pipeline run|report|check-prompts` and `moaa eval`: thin wrappers over moaa.pipeline."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moaa.cli import add_connection_args, add_quiet_arg, max_tokens, positive_int, resamples
from moaa.engines import ENGINE_CHOICES
from moaa.errors import UserError


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", help="JSONL, Parquet or a saved datasets folder (default: the bundled ~50 prompts)")
    p.add_argument("--map", dest="mapping", action="append", default=[], metavar="KEY=FIELD",
                   help="field mapping, KEY one of prompt, messages, id, system (e.g. --map prompt=question)")
    p.add_argument("--split", help="split of a datasets folder (default: train)")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip broken rows, rows without a prompt and duplicate ids (counted, with line numbers)")


def register(subparsers) -> None:
    pipe = subparsers.add_parser("pipeline", help="the whole MoAA recipe: MoA SFT data, SFT, pairs, DPO, eval")
    sub = pipe.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", parser_class=type(pipe))
    sub.required = True
    run = sub.add_parser("run", help="run or resume the pipeline (embedded local stack unless --gateway)")
    _add_prompt_args(run)
    run.add_argument("--out", default="moaa-run", help="run folder (datasets, models, report); re-run to resume")
    run.add_argument("--quick", action="store_true", help="a small version (12 prompts, few steps) for a first look")
    run.add_argument("--gateway", help="HOST:PORT of a running gateway (e.g. from helm install moaa)")
    run.add_argument("--annotator", help="HOST:PORT of a running annotator (needed with --gateway)")
    run.add_argument("--target", help="base model to train: folder or hub id (default: the embedded "
                     "SmolLM2-135M-Instruct; required with --gateway)")
    run.add_argument("--recipe", default="", help="gateway recipe (default: the gateway's default)")
    run.add_argument("--ensemble", default="", help="judge ensemble (default: the annotator's default)")
    run.add_argument("--k8s", action="store_true", help="run SFT and DPO as Kubernetes Jobs (moaa train submit)")
    run.add_argument("--k8s-arg", dest="k8s_args", action="append", default=[], metavar="ARG",
                     help="extra argument for `moaa train submit` (repeat), e.g. --k8s-arg=--namespace=moaa")
    run.add_argument("--token-budget", type=positive_int, help="stop cleanly once the run folder has used N tokens")
    run.add_argument("--eval-judge", choices=["auto", "chat", "ensemble"], default="auto",
                     help="eval judge: the annotator's ensemble (auto, ensemble) or, embedded only, the local "
                          "model asked directly (chat); 1-10 grades (--set eval_grades=true when embedded) use the local model")
    run.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                     help="embedded model server engine")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a setting, value as JSON or a bare string: --set sft.max_steps=20 "
                          "--set sft.trl.save_strategy=no --set dpo.loss_type='[\"sigmoid\"]'")
    add_connection_args(run, "gateway and annotator")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage: sft_data, sft, samples, pairs, dpo, "
                     "answers, training_effect, eval")
    add_quiet_arg(run)
    run.set_defaults(func=_run)

    rep = sub.add_parser("report", help="(re)build the Markdown report of a run folder")
    rep.add_argument("run_folder")
    rep.set_defaults(func=_report)

    chk = sub.add_parser("check-prompts", help="load and validate a prompt file, print what would be used")
    _add_prompt_args(chk)
    chk.set_defaults(func=_check_prompts)

    ev = subparsers.add_parser("eval", help="pairwise win rate (raw, length-controlled, bootstrap CI) and 1-10 grades")
    ev.add_argument("--answers", help="JSONL answers of the model under test")
    ev.add_argument("--contestant", metavar="NAME=URL#model",
                    help="instead of --answers: an OpenAI-compatible endpoint answers the baseline's prompts, e.g. "
                         "moa=http://127.0.0.1:8080/v1#default (the gateway's HTTP door and a recipe)")
    ev.add_argument("--contestant-api-key-env", help="environment variable holding the contestant's API key")
    ev.add_argument("--contestant-max-tokens", type=max_tokens, help="max_tokens of the contestant's answers")
    ev.add_argument("--baseline", required=True, help="JSONL answers of the baseline model, or reference answers")
    ev.add_argument("--name", default="model", help="name of the model under test")
    ev.add_argument("--baseline-name", default="baseline", help="name of the baseline")
    ev.add_argument("--annotator", help="HOST:PORT: judge with the annotator's ensemble")
    ev.add_argument("--ensemble", default="", help="ensemble name (with --annotator)")
    ev.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) of a judge model")
    ev.add_argument("--judge-model", help="served model name of that judge")
    ev.add_argument("--judge-api-key-env", help="environment variable holding the judge's API key")
    ev.add_argument("--grade", action="store_true", help="also grade each answer 1-10 (needs --judge-url)")
    ev.add_argument("--out", default="moaa-eval", help="folder for judgments (resumable) and results")
    ev.add_argument("--bootstrap", type=resamples, default=1000, help="bootstrap resamples for the CIs (at most 100000)")
    add_connection_args(ev, "annotator")
    add_quiet_arg(ev)
    ev.set_defaults(func=_eval)


def pipeline_options(args):
    """`moaa pipeline run`'s flags as the runner's PipelineOptions: every flag named as an option is passed
    as it is, but for the three that are parsed here."""
    from dataclasses import fields

    from moaa.overrides import apply_sets
    from moaa.pipeline.runner import PipelineOptions
    from moaa.prompts import parse_mapping

    named = [a for a in args.k8s_args if a == "--name" or a.startswith("--name=")]
    if named:   # one name for both stages: the DPO Job would meet the finished SFT Job's name, hours later
        raise UserError(f"--k8s-arg={named[0]}: the pipeline names each stage's Job itself (moaa-sft-<hash>, "
                        "moaa-dpo-<hash> of its output folder); remove it")
    given = {f.name: getattr(args, f.name) for f in fields(PipelineOptions) if hasattr(args, f.name)}
    return PipelineOptions(**{**given, "out": Path(args.out), "mapping": parse_mapping(args.mapping),
                              "overrides": apply_sets({}, args.overrides)})


async def _run(args) -> int:
    from moaa.pipeline.runner import format_summary, run_pipeline

    summary = await run_pipeline(pipeline_options(args))
    print(format_summary(summary))
    return 0


def _report(args) -> int:
    from moaa.pipeline.layout import RunLayout
    from moaa.pipeline.report import build_report

    if not Path(args.run_folder).is_dir():
        why = "is not a folder" if Path(args.run_folder).exists() else "does not exist"
        raise UserError(f"run folder {args.run_folder} {why}")
    if not RunLayout(Path(args.run_folder)).run_manifest.exists():   # nothing written into a folder that is no run
        raise UserError(f"{args.run_folder} is not a run folder (no run.json): give the --out of a "
                        "`moaa pipeline run`")
    print(build_report(args.run_folder))
    return 0


def _check_prompts(args) -> int:
    from moaa.prompts import PromptStream, parse_mapping

    stream = PromptStream(args.prompts, mapping=parse_mapping(args.mapping), skip_invalid=args.skip_invalid,
                          split=args.split, limit=args.limit)
    for _ in stream:   # checked row by row: a large set is never held
        pass
    print(f"{stream.count} prompts from {stream.path}; {stream.summary()}")
    return 0


async def _eval(args) -> int:
    from moaa.pipeline.eval.run import evaluate

    if bool(args.answers) == bool(args.contestant):
        raise UserError("give the model's answers: --answers FILE or --contestant NAME=URL#model (one of them)")
    if bool(args.annotator) == bool(args.judge_url):
        raise UserError("give exactly one judge: --annotator HOST:PORT or --judge-url URL --judge-model NAME")
    if args.judge_url and not args.judge_model:
        raise UserError("--judge-url needs --judge-model (the served model name)")
    if args.grade and not args.judge_url:
        raise UserError("--grade needs --judge-url and --judge-model")
    from moaa.pipeline.eval.winrate import format_winrate

    result = await evaluate(args)
    for w in result["winrates"]:
        print(format_winrate(w))
    for model, g in (result.get("grades") or {}).items():
        print(f"{model}: mean grade {g['mean'] if g['mean'] is None else round(g['mean'], 2)} "
              f"({g['n']} graded, {g['abstained']} abstained, {g.get('failed', 0)} failed)")
    print(f"results: {result['out']}", file=sys.stderr)
    return 0
