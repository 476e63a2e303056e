"""What SFT and DPO runs share: bounded start-up, data checks, resume, outputs.

Order matters for failing fast: config (already checked against TRL) -> tokenizer and model, each
under a time bound -> chat template -> data checks with the real tokenizer -> trainer -> train.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from moaa.errors import TransientError, UserError, one_line
from moaa.trainer.chat_template import ensure_chat_template
from moaa.trainer.config import (TrainConfig, build_trl_args, grad_accumulation, mixed_precision, resolve_device,
                                 world_size)
from moaa.trainer.data import DataReport, check_lengths, load_data
from moaa.trainer.manifest import build_manifest, write_manifest
from moaa.trainer.plots import plot_metrics
from moaa.trainer.progress import JsonProgress, run_mean_loss
from moaa.trainer.resume import checkpoint_step, guard_out, newest_checkpoint
from moaa.files import make_folder
from moaa.progress import quiet_progress_bars

log = logging.getLogger(__name__)


def bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run a start-up step with a time bound; a hang becomes a TransientError (exit 75), not a stuck pod."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            box["error"] = err

    t = threading.Thread(target=target, name=f"startup:{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TransientError(f"{what} did not finish within {timeout_s:.0f}s (startup_timeout_s)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def load_model_and_tokenizer(cfg: TrainConfig, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moaa.models import resolve_model

    # fp16 is mixed precision over fp32 weights (fp16 weights cannot be trained with the AMP grad scaler)
    dtype = torch.bfloat16 if mixed_precision(cfg, device) == "bf16" else torch.float32

    # TRL's own model-loading fields, applied here because moaa loads the model (TRL would only for a model name)
    remote = {"trust_remote_code": True} if cfg.trl.get("trust_remote_code") else {}
    init_kwargs = {"dtype": dtype, **remote, **(cfg.trl.get("model_init_kwargs") or {})}

    def load():
        # what `--model` takes everywhere (packaged name, folder, GGUF file, hub id); a folder by its absolute
        # path, which the saved adapter config and the manifest then name wherever they are read
        source = resolve_model(cfg.model).engine_arg
        tok = AutoTokenizer.from_pretrained(source, **remote)
        model = AutoModelForCausalLM.from_pretrained(source, **init_kwargs)
        return model, tok

    try:
        model, tok = bounded(load, cfg.startup_timeout_s, f"loading model {cfg.model}")
    except OSError as err:
        raise UserError(f"cannot load model {cfg.model}: {one_line(err)}") from None
    note = ensure_chat_template(model, tok, cfg.chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok, note


def peft_config(cfg: TrainConfig):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


@dataclass
class Prepared:
    cfg: TrainConfig
    device: str
    world: int
    accum: int
    model: Any
    tokenizer: Any
    template_note: str
    rows: list[dict]
    report: DataReport
    eval_rows: list[dict] | None
    eval_report: DataReport | None
    args: Any
    out: Path
    use_cache: bool | None = None  # the model's own; transformers' Trainer sets config.use_cache=False to train


def finished(cfg: TrainConfig) -> dict[str, Any] | None:
    """The result of this very run (guard_out checked the settings and the data) when its final model is
    saved: a re-run then loads no model and trains nothing (without checkpoints it would train again from the
    start; with them it re-saved the model and recorded a resume that was none). Says so, once."""
    from moaa.trainer.manifest import model_done

    manifest = model_done(Path(cfg.out))
    if manifest is None:
        return None
    result = {"step": manifest["final_step"], "train_loss": manifest.get("train_loss"),
              "resumed_from": manifest.get("resumed_from")}
    _emit({"event": "done_before", "out": str(cfg.out), **result})
    print(f"{cfg.kind}: the final model in {cfg.out} is saved (step {result['step']}): nothing to do",
          file=sys.stderr, flush=True)
    return result


def prepare(cfg: TrainConfig) -> Prepared | dict[str, Any]:
    """Everything a trainer needs, checked before the model loads; the run's result when it is finished."""
    quiet_progress_bars()
    device = resolve_device(cfg)
    world = world_size()
    accum = grad_accumulation(cfg, world)
    args = build_trl_args(cfg, device=device)
    check_packages(args)
    # before the model loads
    rows, report, eval_rows, eval_report = load_data(cfg.data, cfg.eval_data, cfg.kind,
                                                     drop_duplicates=cfg.drop_duplicates)
    guard_out(cfg.out, cfg.model_dump(mode="json"), report.sha256, write=int(os.environ.get("RANK", "0")) == 0)
    done = finished(cfg)
    if done is not None:
        return done
    model, tok, note = load_model_and_tokenizer(cfg, device)
    use_cache = getattr(model.config, "use_cache", None)
    args.model_init_kwargs = None  # applied by our loader; TRL would warn that it ignores them for a loaded model
    rows = check_lengths(rows, report, tok, cfg.max_length, cfg.drop_overlong)
    if eval_rows is not None:
        eval_rows = check_lengths(eval_rows, eval_report, tok, cfg.max_length, cfg.drop_overlong)
    out = make_folder(cfg.out)
    _emit({"event": "data", **{k: v for k, v in report.summary().items() if k != "path"}})
    return Prepared(cfg, device, world, accum, model, tok, note, rows, report, eval_rows, eval_report, args, out,
                    use_cache)


def check_packages(args) -> None:
    """The packages `trl.report_to` and `trl.use_liger_kernel` need are installed here (TRL's trainer would
    fail only after the model loads, or at step 0)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.utils import is_liger_kernel_available

    available = get_available_reporting_integrations()
    missing = [r for r in args.report_to if r not in ("none", "all") and r not in available]
    if missing:
        raise UserError(f"trl.report_to {', '.join(missing)}: not installed here (pip install {' '.join(missing)}), "
                        "or leave report_to at none")
    if args.use_liger_kernel and not is_liger_kernel_available():
        raise UserError("trl.use_liger_kernel needs liger-kernel, which is not installed here "
                        "(pip install liger-kernel)")


def build_trainer(make: Callable[[], Any], p: Prepared):
    """TRL's trainer checks some settings only once model, tokenizer and data meet (assistant_only_loss on a
    chat template without generation markers, for one): its refusal is bad input, exit 2, not a crash."""
    try:
        return make()
    except ValueError as err:
        raise UserError(f"TRL refuses the {p.cfg.kind.upper()} run: {one_line(err)}") from None


def trainer_datasets(p: Prepared) -> dict[str, Any]:
    """train_dataset and (with eval_data) eval_dataset, as the trainers take them."""
    from moaa.trainer.data import to_dataset

    out = {"train_dataset": to_dataset(p.rows, p.cfg.kind)}
    if p.eval_rows is not None:
        out["eval_dataset"] = to_dataset(p.eval_rows, p.cfg.kind)
    return out


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def train_and_save(p: Prepared, trainer) -> dict[str, Any]:
    """Resume from the newest checkpoint, train, save the final model and the run's records."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; our JSON lines replace it
    trainer.remove_callback(ProgressCallback)
    ckpt = newest_checkpoint(p.out)
    if ckpt:
        _emit({"event": "resume", "checkpoint": ckpt, "step": checkpoint_step(ckpt)})
    result = trainer.train(resume_from_checkpoint=ckpt)
    step = trainer.state.global_step
    train_loss = run_mean_loss(trainer.state.log_history, result.training_loss)
    if p.use_cache is not None:  # the saved config is the base's, not training's (no KV cache in plain forwards)
        p.model.config.use_cache = p.use_cache
    if p.cfg.lora.enabled and p.cfg.lora.merge:
        if trainer.is_world_process_zero():  # adapters merged into plain weights: loads without peft
            trainer.accelerator.unwrap_model(trainer.model).merge_and_unload().save_pretrained(p.out)
    else:
        trainer.save_model(str(p.out))  # every rank calls it: gathers sharded (FSDP/DeepSpeed) weights
    if trainer.is_world_process_zero():
        p.tokenizer.save_pretrained(p.out)
        plot = plot_metrics(p.out / "metrics.jsonl", p.out / f"{p.cfg.kind}_curves.png", p.cfg.kind)
        manifest = build_manifest(
            p.cfg, data_report=p.report, model_path=getattr(p.model, "name_or_path", None), world=p.world, grad_accum=p.accum, device=p.device,
            chat_template=p.template_note, resumed_from=ckpt, trl_args=p.args.to_dict(), final_step=step,
            train_loss=train_loss, plot=str(plot) if plot else None,
            eval_data=p.eval_report.summary() if p.eval_report else None)
        write_manifest(p.out, manifest)
        _emit({"event": "saved", "out": str(p.out), "step": step, "train_loss": train_loss})
    return {"step": step, "train_loss": train_loss, "resumed_from": ckpt}


def callbacks(p: Prepared) -> list:
    return [JsonProgress(p.out / "metrics.jsonl", stream=sys.stdout, kind=p.cfg.kind)]
