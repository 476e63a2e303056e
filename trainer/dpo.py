"""DPO on MoA-judged preference pairs with TRL's DPOTrainer, and its typed settings.

The reference model is loaded explicitly (a second copy, same chat-template fix-ups) rather than
left to TRL, which would reload it from the model's saved path and miss tokens added in memory. With
LoRA there is no second copy: TRL uses the base weights with adapters disabled.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from moaa.errors import UserError
from moaa.trainer.config import TrainConfig


class DPOSettings(TrainConfig):
    """`moaa train dpo` settings (and the pipeline's `dpo.*`); mapped onto TRL's DPOConfig."""

    DEFAULT_LR: ClassVar[float] = 5e-7
    ALWAYS_SHOWN: ClassVar[tuple[str, ...]] = TrainConfig.ALWAYS_SHOWN + ("beta", "loss_type")

    kind: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="strength of the KL penalty towards the reference")
    loss_type: list[str] = Field(default_factory=lambda: ["sigmoid"], min_length=1,
                                 description="DPO loss type(s) TRL knows")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _one_loss_type(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # as DPOConfig takes it: loss_type=sigmoid

    @classmethod
    def trl_class(cls):
        from trl import DPOConfig

        return DPOConfig

    def trl_own(self) -> dict[str, Any]:
        return {"beta": self.beta, "loss_type": list(self.loss_type)}

    def check_trl(self, kw: dict[str, Any]) -> None:
        types = kw.get("loss_type") or []
        types = [types] if isinstance(types, str) else list(types)
        known = known_dpo_loss_types()
        bad = [t for t in types if t not in known]
        if known and bad:
            import trl

            raise UserError(f"DPO loss_type {', '.join(bad)} is not one the installed trl {trl.__version__} knows: "
                            f"{', '.join(known)}")


def known_dpo_loss_types() -> list[str]:
    """Loss types the installed TRL documents on DPOConfig.loss_type (the trainer only fails at step 1)."""
    from trl import DPOConfig

    help_text = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata.get("help", "")
    return re.findall(r"`'([a-z_0-9]+)'`", help_text)


def run_dpo(cfg: DPOSettings) -> dict[str, Any]:
    from trl import DPOTrainer

    from moaa.trainer.runner import (build_trainer, callbacks, load_model_and_tokenizer, peft_config, prepare,
                                     train_and_save, trainer_datasets)

    p = prepare(cfg)
    if isinstance(p, dict):   # the final model of this run is saved: nothing to do
        return p
    ref = None
    if not cfg.lora.enabled:
        ref, _, _ = load_model_and_tokenizer(cfg, p.device)
        ref.eval()
    trainer = build_trainer(lambda: DPOTrainer(model=p.model, ref_model=ref, args=p.args, **trainer_datasets(p),
                                               processing_class=p.tokenizer, peft_config=peft_config(cfg),
                                               callbacks=callbacks(p)), p)
    return train_and_save(p, trainer)
