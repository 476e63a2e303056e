"""Typed training config: a YAML file plus command-line overrides, checked before anything starts.

Two layers are checked. Our own fields (pydantic, extra="forbid") cover what users tune. Everything is
then mapped onto the INSTALLED TRL's SFTConfig / DPOConfig and constructed once, so a field that this
TRL does not have (recipes drift: the handbook's zephyr DPO recipe still sets `max_prompt_length`) or a
value TRL refuses stops the run with one readable line before a model is loaded or a Job submitted.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moaa.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    enabled: bool = Field(False, description="train LoRA adapters through peft instead of all weights")
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")
    merge: bool = Field(True, description="merge adapters into the base weights when saving the final model")


class TrainConfig(_Strict):
    """What a user tunes for one SFT or DPO run. Field names follow TRL where they mean the same."""

    kind: Literal["sft", "dpo"] = Field(description="which trainer")
    model: str = Field(description="model folder (Hugging Face format) or hub id")
    data: str = Field(description="JSONL file: SFT rows {messages} or preference rows {prompt, chosen, rejected}")
    out: str = Field(description="output folder: checkpoints, final model, metrics, plots, manifest")
    learning_rate: float | None = Field(None, gt=0, description="peak LR; default 2e-5 for SFT, 5e-7 for DPO")
    lr_scheduler_type: str = Field("cosine", description="transformers scheduler name: linear, cosine, constant, ...")
    warmup_steps: float = Field(0.1, ge=0, description="warmup: steps, or a fraction of all steps when < 1")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    num_train_epochs: float = Field(1.0, gt=0, description="epochs (ignored when max_steps > 0)")
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides num_train_epochs")
    global_batch_size: int = Field(16, ge=1, description="sequences per optimizer step, all GPUs together")
    per_device_batch_size: int = Field(1, ge=1, description="sequences per forward pass per device")
    max_length: int = Field(1024, ge=8, description="longest tokenized row (prompt + answer)")
    beta: float = Field(0.1, gt=0, description="DPO: strength of the KL penalty towards the reference")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], description="DPO loss type(s) TRL knows")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save GPU memory")
    packing: bool = Field(False, description="SFT: pack rows into max_length blocks (TRL bfd packing)")
    padding_free: bool = Field(False, description="batch without padding (needs flash-attention on GPU)")
    seed: int = Field(42, description="seed for weights init, dropout and data order")
    save_steps: int = Field(100, ge=1, description="checkpoint every N optimizer steps")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept (oldest deleted)")
    logging_steps: int = Field(1, ge=1, description="metrics every N steps")
    drop_overlong: bool = Field(False, description="drop rows longer than max_length (counted) instead of failing")
    drop_duplicates: bool = Field(True, description="drop rows whose content repeats an earlier row (counted)")
    chat_template: str | None = Field(None, description="jinja file for a base model without a chat template")
    startup_timeout_s: float = Field(600.0, gt=0, description="bound on loading model and tokenizer")
    trl: dict[str, Any] = Field(default_factory=dict, description="extra fields passed as they are to TRL's config")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be a positive number of steps, or -1 to train by epochs")
        if isinstance(self.loss_type, str):  # pragma: no cover - pydantic already coerces lists
            self.loss_type = [self.loss_type]
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-5 if self.kind == "sft" else 5e-7)


def world_size() -> int:
    """Processes in this run (torchrun/accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accumulation(cfg: TrainConfig, world: int | None = None) -> int:
    """Accumulation steps that keep the global batch what the config says on any GPU count."""
    world = world or world_size()
    per_step = cfg.per_device_batch_size * world
    if cfg.global_batch_size % per_step:
        raise UserError(
            f"global_batch_size {cfg.global_batch_size} is not a multiple of per_device_batch_size "
            f"{cfg.per_device_batch_size} x world size {world} = {per_step}; change one of them")
    return cfg.global_batch_size // per_step


def resolve_device(cfg: TrainConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _parse_value(text: str) -> Any:
    """JSON values (numbers, true/false, null, lists); anything else stays a string.

    Not YAML: YAML 1.1 reads `no`/`off` as false, so `trl.save_strategy=no` would become False."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        pass
    if text[:1] in "[{":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"cannot parse override value {text!r}") from None
    return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key=value` or `a.b=value` (YAML-typed values) on top of the file's dict."""
    out = dict(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(value)
    return out


def _trl_config_class(kind: str):
    from trl import DPOConfig, SFTConfig

    return SFTConfig if kind == "sft" else DPOConfig


def _trl_fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_trl_config_class(kind))}


def _format_validation(err: ValidationError, kind: str) -> str:
    parts = []
    trl_fields = _trl_fields(kind)
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            if loc in trl_fields:
                parts.append(f"{loc} is a TRL field: put it under `trl:` (trl.{loc}=...)")
            else:
                parts.append(f"{loc} is not a moaa train field nor a field of the installed {_trl_version()} "
                             f"{_trl_config_class(kind).__name__} (removed or misspelt?)")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _trl_version() -> str:
    import trl

    return f"trl {trl.__version__}"


def load_train_config(kind: str, path: str | None = None, overrides: list[str] | None = None,
                      **values: Any) -> TrainConfig:
    """File (optional) < keyword values < `key=value` overrides; errors are UserError (exit 2)."""
    data: dict[str, Any] = {}
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist") from None
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of fields")
        data.update(loaded or {})
    data.update({k: v for k, v in values.items() if v is not None})
    data["kind"] = kind
    data = apply_overrides(data, overrides or [])
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as err:
        where = f" in {path}" if path else ""
        raise UserError(f"bad train config{where}: {_format_validation(err, kind)}") from None
    build_trl_args(cfg, check_only=True)
    return cfg


def trl_kwargs(cfg: TrainConfig, device: str | None = None, world: int | None = None) -> dict[str, Any]:
    """Our fields mapped onto TRL's config names (and TrainingArguments')."""
    device = device or resolve_device(cfg)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device == "cuda")
    kw: dict[str, Any] = dict(
        output_dir=cfg.out, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation(cfg, world), max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing, padding_free=cfg.padding_free, seed=cfg.seed,
        data_seed=cfg.seed, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, logging_steps=cfg.logging_steps, report_to="none",
        bf16=bf16, use_cpu=device == "cpu", disable_tqdm=True, dataloader_num_workers=0,
    )
    if cfg.kind == "sft":
        kw.update(packing=cfg.packing)
    else:
        kw.update(beta=cfg.beta, loss_type=list(cfg.loss_type))
        if cfg.packing:
            raise UserError("packing is an SFT option; DPO batches pairs (use padding_free instead)")
    kw.update(cfg.trl)
    if cfg.kind == "dpo":
        _check_loss_types(kw.get("loss_type") or [])
    return kw


def known_dpo_loss_types() -> list[str]:
    """Loss types the installed TRL documents on DPOConfig.loss_type (the trainer only fails at step 1)."""
    import re

    from trl import DPOConfig

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata.get("help", "")
    return re.findall(r"`'([a-z_0-9]+)'`", help_text)


def _check_loss_types(types) -> None:
    types = [types] if isinstance(types, str) else list(types)
    known = known_dpo_loss_types()
    bad = [t for t in types if t not in known]
    if known and bad:
        raise UserError(f"DPO loss_type {', '.join(bad)} is not one the installed {_trl_version()} knows: "
                        f"{', '.join(known)}")


def build_trl_args(cfg: TrainConfig, *, check_only: bool = False, device: str | None = None):
    """Construct the installed TRL's config from ours; any refusal is a UserError naming the field."""
    cls = _trl_config_class(cfg.kind)
    kw = trl_kwargs(cfg, device=device)
    unknown = sorted(set(kw) - _trl_fields(cfg.kind))
    if unknown:
        raise UserError(f"{', '.join(unknown)}: not a field of the installed {_trl_version()} {cls.__name__} "
                        f"(removed or renamed?); remove it from the config")
    try:
        args = cls(**kw)
    except (ValueError, TypeError) as err:
        raise UserError(f"{_trl_version()} {cls.__name__} refuses the config: {str(err).splitlines()[0]}") from None
    return None if check_only else args


# Shown on the command line even at their defaults: what a reader of a Job manifest looks for first.
_ALWAYS_SHOWN = {"sft": ("learning_rate", "global_batch_size", "num_train_epochs", "max_steps"),
                 "dpo": ("learning_rate", "global_batch_size", "num_train_epochs", "max_steps", "beta", "loss_type")}


def cli_args(cfg: TrainConfig) -> list[str]:
    """The resolved config as `moaa train KIND` arguments (Jobs and torchrun workers run exactly this)."""
    import json

    args = ["--data", cfg.data, "--model", cfg.model, "--out", cfg.out]
    values = cfg.model_dump(mode="json", exclude={"kind", "data", "model", "out"})
    changed = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"kind", "data", "model", "out"})
    keys = set(changed) | set(_ALWAYS_SHOWN[cfg.kind])
    values["learning_rate"] = cfg.lr
    for key in sorted(keys):
        args += ["--set", f"{key}={json.dumps(values[key], separators=(',', ':'))}"]
    return args
