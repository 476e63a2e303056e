"""Typed training config: a YAML file plus `--set` overrides, checked before anything starts.

TrainConfig holds what SFT and DPO share; SFTSettings (trainer/sft.py) and DPOSettings (trainer/dpo.py)
add their own fields. Two layers are checked. Our own fields (pydantic, extra="forbid") cover what users
tune. Everything is then mapped onto the INSTALLED TRL's SFTConfig / DPOConfig (`trl.*` values against
the types TRL declares) and constructed once, so a field that this TRL does not have (recipes drift: the
handbook's zephyr DPO recipe still sets `max_prompt_length`) or a value TRL refuses stops the run with
one readable line before a model is loaded or a Job submitted. A TRL field moaa fills from one of its own
settings (SET_FROM, or the same name) is refused under `trl.` with the setting to use: one route per value,
so the data checks and the manifest see what TRL trains with. TRL_DEFAULTS are moaa's own defaults for
fields it does not own; `trl.X` overrides them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from moaa.errors import UserError, one_line
from moaa.overrides import apply_sets, format_set, load_mapping


class _Strict(BaseModel):
    # strict, as trl.* values are checked: true is no step count and "yes" no switch; finite: an infinite
    # learning rate trains to NaN weights and exits 0, infinite epochs crash later
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_floats(cls, data: Any) -> Any:
        """A whole number written as a float (2.0, YAML's 1e+06) is that count: strict mode alone refuses it."""
        if not isinstance(data, dict):
            return data
        ints = {name for name, f in cls.model_fields.items()
                if f.annotation is int or (typing.get_origin(f.annotation) in (typing.Union, types.UnionType)
                                           and int in typing.get_args(f.annotation))}
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


class LoraSettings(_Strict):
    enabled: bool = Field(False, description="train LoRA adapters through peft instead of all weights")
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names, or 'all-linear'")
    merge: bool = Field(True, description="merge adapters into the base weights when saving the final model")


class TrainConfig(_Strict):
    """What SFT and DPO runs share; SFTSettings (trainer/sft.py) and DPOSettings (trainer/dpo.py) add their
    own fields, as TRL keeps SFTConfig beside SFTTrainer. Field names follow TRL where they mean the same."""

    DEFAULT_LR: ClassVar[float] = 2e-5
    # shown on the command line even at their defaults: what a reader of a Job manifest looks for first
    ALWAYS_SHOWN: ClassVar[tuple[str, ...]] = ("learning_rate", "global_batch_size", "num_train_epochs", "max_steps")

    kind: str = Field(description="sft or dpo (set by the subclass)")
    model: str = Field(description="model folder (Hugging Face format) or hub id")
    data: str = Field(description="JSONL file: SFT rows {messages} or preference rows {prompt, chosen, rejected}")
    eval_data: str | None = Field(None, description="held-out JSONL in the format of data: TRL's eval_dataset, "
                                                    "evaluated every save_steps (trl.eval_strategy/eval_steps)")
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
    lora: LoraSettings = Field(default_factory=LoraSettings)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU; bf16 also runs on CPU; fp16 (mixed) needs a GPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    gradient_checkpointing: bool = Field(False, description="recompute activations to save GPU memory")
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
        return self

    @property
    def lr(self) -> float:
        return self.learning_rate or self.DEFAULT_LR

    @classmethod
    def trl_class(cls):
        """The installed TRL's config class for this kind (imported only when asked)."""
        raise NotImplementedError

    def trl_own(self) -> dict[str, Any]:
        """This kind's own fields under TRL's names."""
        return {}

    def check_trl(self, kw: dict[str, Any]) -> None:
        """Checks TRL itself would only make at step 1."""


def settings_class(kind: str) -> type[TrainConfig]:
    """SFTSettings or DPOSettings (beside the trainer that uses them)."""
    if kind == "sft":
        from moaa.trainer.sft import SFTSettings

        return SFTSettings
    if kind == "dpo":
        from moaa.trainer.dpo import DPOSettings

        return DPOSettings
    raise UserError(f"unknown training kind {kind!r}: sft or dpo")


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


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(cfg: TrainConfig) -> str:
    """The device this run trains on; device cuda where no GPU is visible is bad input."""
    if cfg.device == "cuda" and not _cuda_here():
        raise UserError("device cuda: no CUDA GPU is visible on this machine; use device auto or cpu")
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if _cuda_here() else "cpu"


def mixed_precision(cfg: TrainConfig, device: str) -> str | None:
    """"bf16", "fp16" or None (fp32) for this run. fp16 on CPU is refused: TRL would train in fp32 silently."""
    if cfg.precision == "fp16" and device != "cuda":
        raise UserError(f"precision fp16 needs a CUDA GPU (this run is on {device}): use precision bf16 or fp32")
    if cfg.precision in ("bf16", "fp16"):
        return cfg.precision
    return "bf16" if cfg.precision == "auto" and device == "cuda" else None


# TRL fields moaa fills from a setting of its own under another name: `trl.X` (or X) names that setting instead,
# so the data checks, the manifest and the global batch never disagree with what TRL trains (one route per value).
SET_FROM = {"output_dir": "--out", "per_device_train_batch_size": "per_device_batch_size",
            "gradient_accumulation_steps": "global_batch_size (accumulation is derived from it)",
            "bf16": "precision", "fp16": "precision", "use_cpu": "device", "data_seed": "seed",
            "chat_template_path": "chat_template"}
# TRL fields a moaa run would silently ignore, and why (model_init_kwargs and trust_remote_code are applied:
# moaa loads the model, as TRL does when given a model name)
NOT_PASSED = {"resume_from_checkpoint": "moaa resumes from the newest complete checkpoint in --out by itself",
              "save_only_model": "a resumed run needs its checkpoints' optimizer and scheduler state (without it the "
                                 "warmup and the optimizer start over, and the run differs from an uninterrupted one)"}
# moaa's defaults for TRL fields it does not own (TRL's differ): `trl.X` overrides each one.
TRL_DEFAULTS: dict[str, Any] = {"save_strategy": "steps", "report_to": "none", "disable_tqdm": True,
                                "dataloader_num_workers": 0}


def _set_instead(name: str) -> str:
    if name in NOT_PASSED:
        return f"not taken: {NOT_PASSED[name]}"
    owner = SET_FROM.get(name, name)
    return f"moaa sets TRL's {name} from its own setting {owner}: set {owner.split()[0]} instead"


def _trl_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _format_validation(err: ValidationError, cls: type[TrainConfig]) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "missing" and loc in ("data", "model", "out"):
            parts.append(f"{loc} is required: give --{loc}, or {loc}: in the --config file")
        elif e["type"] == "extra_forbidden":
            trl_cls = cls.trl_class()
            if loc in SET_FROM or loc in NOT_PASSED:
                parts.append(f"{loc}: {_set_instead(loc)}")
            elif loc in _trl_fields(trl_cls):
                parts.append(f"{loc} is a TRL field: put it under `trl:` (trl.{loc}=...)")
            else:
                parts.append(f"{loc} is not a moaa {cls.__name__} field nor a field of the installed "
                             f"{_trl_version()} {trl_cls.__name__} (removed or misspelt?)")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _trl_version() -> str:
    import trl

    return f"trl {trl.__version__}"


def build_train_config(kind: str, data: dict[str, Any], *, where: str = "train config",
                       trl_check: bool = True) -> TrainConfig:
    """Typed settings from a plain dict; errors are one-line UserErrors (exit 2).

    trl_check=False checks only our own fields (no TRL import: the pipeline does this in-process at start
    and has a child `moaa train KIND --check` run the TRL check)."""
    cls = settings_class(kind)
    try:
        cfg = cls.model_validate({**data, "kind": kind})
    except ValidationError as err:
        raise UserError(f"bad {where}: {_format_validation(err, cls)}") from None
    if trl_check:
        build_trl_args(cfg, check_only=True)
    return cfg


def load_train_config(kind: str, path: str | None = None, overrides: list[str] | None = None,
                      **values: Any) -> TrainConfig:
    """File (optional) < keyword values < `--set key=value` overrides; errors are UserError (exit 2)."""
    data: dict[str, Any] = load_mapping(path) if path else {}
    data.update({k: v for k, v in values.items() if v is not None})
    data = apply_sets(data, overrides or [])
    return build_train_config(kind, data, where=f"train config in {path}" if path else "train config")


def trl_kwargs(cfg: TrainConfig, device: str | None = None, world: int | None = None) -> dict[str, Any]:
    """Our fields mapped onto TRL's config names (and TrainingArguments')."""
    device = device or resolve_device(cfg)
    precision = mixed_precision(cfg, device)
    owned: dict[str, Any] = dict(
        output_dir=cfg.out, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=grad_accumulation(cfg, world), max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing, padding_free=cfg.padding_free, seed=cfg.seed,
        data_seed=cfg.seed, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
    )
    owned.update(cfg.trl_own())
    clash = sorted(set(cfg.trl) & (set(owned) | set(SET_FROM) | set(NOT_PASSED)))
    if clash:
        raise UserError("; ".join(f"trl.{k}: {_set_instead(k)}" for k in clash))
    defaults = dict(TRL_DEFAULTS)
    if cfg.eval_data:
        defaults.update(eval_strategy="steps", eval_steps=cfg.save_steps)
    kw = {**owned, **defaults, **cfg.trl}
    evals = [f"{k}={kw[k]}" for k in ("eval_strategy", "eval_on_start") if kw.get(k) not in (None, False, "no")]
    if evals and not cfg.eval_data:
        raise UserError(f"trl.{' and trl.'.join(evals)} needs held-out rows: set eval_data to a JSONL "
                        "in the format of data")
    cfg.check_trl(kw)
    return kw


def _alternatives(hint) -> set:
    return {typing.get_origin(a) or a for a in (typing.get_args(hint) or (hint,))}


def _json_object(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _check_trl_types(cls, trl: dict[str, Any]) -> None:
    """`trl.*` values against the types TRL declares (strict: "no" is not a bool, "abc" not a float)."""
    from pydantic import TypeAdapter

    hints = typing.get_type_hints(cls)
    bad = []
    for key, value in trl.items():
        if key not in hints:
            continue
        try:
            adapter = TypeAdapter(hints[key])
        except Exception:  # a type pydantic cannot describe: TRL checks it itself  # noqa: BLE001
            continue
        try:
            adapter.validate_python(value, strict=True)
        except ValidationError as err:
            hint = hints[key].__name__ if isinstance(hints[key], type) else str(hints[key])
            bad.append(f"trl.{key}={value!r}: {err.errors()[0]['msg']} (TRL declares {hint})")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"trl.{key}={value!r}: give a finite number")
        elif isinstance(value, str) and dict in _alternatives(hints[key]) and not _json_object(value):
            # dict | str fields (lr_scheduler_kwargs, ...): the string form is a JSON object, as TRL parses it
            bad.append(f"trl.{key}={value!r}: give a mapping, e.g. --set trl.{key}={{\"k\":1}}")
    if bad:
        raise UserError(f"{_trl_version()} {cls.__name__}: {'; '.join(bad)}")


def build_trl_args(cfg: TrainConfig, *, check_only: bool = False, device: str | None = None):
    """Construct the installed TRL's config from ours; any refusal is a UserError naming the field.

    A run gives its device. Without one the config is checked for wherever it will run: a GPU-only config
    (device cuda, precision fp16) checked where there is no GPU (`moaa train submit` from a laptop, the
    pipeline's `--check` before Jobs) has its fields and types checked as a CPU config here, and is checked
    in full by the run on the GPU node, before the model loads."""
    if device is None and (cfg.device == "cuda" or cfg.precision == "fp16") and not _cuda_here():
        cfg, device = cfg.model_copy(update={"device": "cpu", "precision": "fp32"}), "cpu"
    cls = cfg.trl_class()
    kw = trl_kwargs(cfg, device=device)
    unknown = sorted(set(kw) - _trl_fields(cls))
    if unknown:
        raise UserError(f"{', '.join(unknown)}: not a field of the installed {_trl_version()} {cls.__name__} "
                        f"(removed or renamed?); remove it from the config")
    _check_trl_types(cls, cfg.trl)
    try:
        args = cls(**kw)
    except (ValueError, TypeError) as err:
        raise UserError(f"{_trl_version()} {cls.__name__} refuses the config: {one_line(err)}") from None
    return None if check_only else args


def cli_args(cfg: TrainConfig) -> list[str]:
    """THE serialiser of a training config: `moaa train KIND` arguments in the one `--set` grammar.

    The pipeline's trainer children, torchrun/accelerate workers and Kubernetes Jobs all run exactly this;
    `load_train_config(kind, None, cli_args(cfg)[6:], ...)` gives back an equal config (tested)."""
    args = ["--data", cfg.data, "--model", cfg.model, "--out", cfg.out]
    values = cfg.model_dump(mode="json", exclude={"kind", "data", "model", "out"})
    changed = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"kind", "data", "model", "out"})
    values["learning_rate"] = cfg.lr
    for key in sorted(set(changed) | set(cfg.ALWAYS_SHOWN)):
        args += ["--set", format_set(key, values[key])]
    return args
