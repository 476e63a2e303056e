"""`moaa train sft|dpo|submit` and `moaa sample`: thin wrappers over moaa.trainer."""
from __future__ import annotations

import argparse
from pathlib import Path

from moaa.cli import add_quiet_arg, positive_float, positive_int, samples_per_prompt, sampling_value
from moaa.engines import ENGINE_CHOICES

# Flags that map one-to-one onto TrainConfig fields (flag -> field).
_FIELD_FLAGS = [
    ("--lr", "learning_rate", positive_float, "peak learning rate"),
    ("--schedule", "lr_scheduler_type", str, "LR schedule: cosine, linear, constant, ..."),
    ("--epochs", "num_train_epochs", positive_float, "epochs (ignored with --max-steps)"),
    ("--max-steps", "max_steps", positive_int, "optimizer steps"),
    ("--batch-size", "global_batch_size", positive_int, "global batch: sequences per optimizer step, all GPUs"),
    ("--per-device-batch-size", "per_device_batch_size", positive_int, "sequences per forward pass per device"),
    ("--max-length", "max_length", positive_int, "longest tokenized row"),
    ("--eval-data", "eval_data", str, "held-out rows in the format of --data (TRL's eval_dataset)"),
    ("--beta", "beta", float, "DPO beta"),
    ("--save-steps", "save_steps", positive_int, "checkpoint every N steps"),
    ("--seed", "seed", int, "seed for init, dropout and data order"),
    ("--device", "device", str, "auto, cpu or cuda"),
]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    # --data/--model/--out may come from the --config file instead (the typed config requires them)
    p.add_argument("--config", help="YAML or JSON file with SFTSettings / DPOSettings fields")
    p.add_argument("--data", help="JSONL, Parquet or a saved datasets folder: SFT rows {messages} or "
                   "{prompt,completion} / pairs {prompt,chosen,rejected}")
    p.add_argument("--model", help="model folder or hub id (DPO: the SFT output folder)")
    p.add_argument("--out", help="output folder (checkpoints, model, metrics, plots)")
    for flag, field, typ, help_ in _FIELD_FLAGS:
        p.add_argument(flag, dest=field, type=typ, help=help_)
    p.add_argument("--loss-type", dest="loss_type", action="append", help="DPO loss type (repeat to combine)")
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (peft)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, value as JSON or a bare string: --set lora.r=8 --set trl.save_strategy=no")


def _config_from_args(kind: str, args: argparse.Namespace):
    from moaa.trainer.config import load_train_config

    values = {"data": args.data, "model": args.model, "out": args.out, "loss_type": args.loss_type}
    values.update({field: getattr(args, field) for _, field, _, _ in _FIELD_FLAGS})
    overrides = list(args.overrides)
    if args.lora:
        overrides.append("lora.enabled=true")
    return load_train_config(kind, args.config, overrides, **values)


def _run_train(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args.kind, args)
    if cfg.chat_template and args.check != "job" and not Path(cfg.chat_template).is_file():
        from moaa.errors import UserError   # found after the model loaded otherwise (exit 1)

        raise UserError(f"chat_template {cfg.chat_template}: no such file (give a jinja template file)")
    if args.nproc_per_node > 1:   # the workers' global batch rule, here and not in each of N workers
        from moaa.trainer.config import grad_accumulation

        grad_accumulation(cfg, args.nproc_per_node)
    if args.check:  # checked against the installed TRL (load_train_config did that); nothing is trained
        import json

        from moaa.trainer.config import build_trl_args, resolve_device

        # what TRL made of the trl.* pass-through, as the trainer will see it here (or on a Job's GPU node)
        trl_args = build_trl_args(cfg, device=None if args.check == "job" else resolve_device(cfg))
        if args.check == "here":  # what a run here refuses before its model loads (a Job's image has its own)
            from moaa.trainer.runner import check_packages

            check_packages(trl_args)
        trl = trl_args.to_dict()
        print(json.dumps({"event": "config_ok", "kind": cfg.kind, "trl": {k: trl.get(k) for k in cfg.trl}},
                         default=str), flush=True)
        return 0
    from moaa.trainer.launch import is_worker, launch

    if args.nproc_per_node > 1 and not is_worker():
        return launch(cfg, args.nproc_per_node, args.launcher)
    if args.kind == "sft":
        from moaa.trainer.sft import run_sft as run
    else:
        from moaa.trainer.dpo import run_dpo as run
    run(cfg)
    return 0


def _run_submit(args: argparse.Namespace) -> int:
    from moaa.trainer.k8s_submit import submit_from_args

    return submit_from_args(args, _config_from_args(args.kind, args))


def _run_sample(args: argparse.Namespace) -> int:
    from moaa.trainer.sample import SampleSettings, run_sample

    settings = SampleSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                              engine=args.engine)
    run_sample(args.model, args.prompts, args.out, settings, quiet=args.quiet, skip_invalid=args.skip_invalid)
    return 0


def _run_logprobs(args: argparse.Namespace) -> int:
    from moaa.errors import UserError
    from moaa.trainer.effect import run_logprobs

    models = {}
    for item in args.model:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise UserError(f"bad --model {item!r}: use NAME=MODEL")
        if name in models:
            raise UserError(f"--model {name}=... is given twice; give each name once")
        models[name] = spec
    run_logprobs(models, args.items, args.out, args.max_length)
    return 0


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="SFT and DPO with TRL, locally or as a Kubernetes Job")
    sub = train.add_subparsers(dest="train_command", metavar="KIND", parser_class=type(train))
    sub.required = True
    for kind, help_ in (("sft", "supervised fine-tuning on {messages} rows"),
                        ("dpo", "DPO on {prompt, chosen, rejected} rows")):
        p = sub.add_parser(kind, help=help_)
        _add_train_args(p)
        p.add_argument("--nproc-per-node", type=positive_int, default=1,
                       help="processes (GPUs) on this node; >1 starts torchrun")
        p.add_argument("--launcher", choices=["torchrun", "accelerate"], default="torchrun")
        p.add_argument("--check", nargs="?", const="here", choices=["here", "job"],
                       help="check the settings against the installed TRL and exit: for this machine (default), or "
                            "for a Job (job: GPU-only settings are checked as on CPU here, in full on the GPU node)")
        p.set_defaults(func=_run_train, kind=kind)

    submit = sub.add_parser("submit", help="run sft or dpo as a Kubernetes Job and follow it")
    submit.add_argument("kind", choices=["sft", "dpo"])
    _add_train_args(submit)
    from moaa.trainer.k8s_submit import add_submit_args

    add_submit_args(submit)
    submit.set_defaults(func=_run_submit)

    sample = subparsers.add_parser("sample", help="stage 2: draw n answers per prompt from the SFT model")
    sample.add_argument("--model", required=True,
                        help="the SFT output folder, or any packaged name, model folder, GGUF file or hub id")
    sample.add_argument("--prompts", required=True, help="JSONL rows {id, prompt: [messages]} (or {messages})")
    sample.add_argument("--out", required=True, help="output JSONL, appended to and resumed by id")
    sample.add_argument("--n", type=samples_per_prompt, default=5, help="answers per prompt (at most 64)")
    sample.add_argument("--temperature", type=sampling_value("temperature"), default=0.8, help="0..2")
    sample.add_argument("--top-p", type=sampling_value("top_p"), default=0.95, help="in (0, 1]")
    sample.add_argument("--max-new-tokens", type=positive_int, default=512)
    sample.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call (transformers)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--skip-invalid", action="store_true",
                        help="skip broken rows, rows without a prompt and duplicate ids (counted, with line numbers)")
    sample.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="auto: vLLM offline engine on a GPU node when installed, else transformers")
    add_quiet_arg(sample)
    sample.set_defaults(func=_run_sample)

    lp = subparsers.add_parser("logprobs", help="summed log-probabilities of completions under each model")
    lp.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                    help="a name and a packaged name, model folder, GGUF file or hub id (repeat)")
    lp.add_argument("--items", required=True, help="JSONL rows {id, prompt: [messages], completion: [messages]}")
    lp.add_argument("--out", required=True, help="output JSON: {name: {id: [sum_logp, tokens]}}")
    lp.add_argument("--max-length", type=positive_int, default=512, help="longest tokenized row (as in training)")
    lp.set_defaults(func=_run_logprobs)
