"""Supervised fine-tuning on MoA answers with TRL's SFTTrainer, and its typed settings."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from moaa.trainer.config import TrainConfig


class SFTSettings(TrainConfig):
    """`moaa train sft` settings (and the pipeline's `sft.*`); mapped onto TRL's SFTConfig."""

    DEFAULT_LR: ClassVar[float] = 2e-5

    kind: Literal["sft"] = "sft"
    packing: bool = Field(False, description="pack rows into max_length blocks (TRL bfd packing)")

    @classmethod
    def trl_class(cls):
        from trl import SFTConfig

        return SFTConfig

    def trl_own(self) -> dict[str, Any]:
        own: dict[str, Any] = {"packing": self.packing}
        if self.padding_free and not self.packing:
            # TRL refuses padding_free with a max_length it cannot enforce without packing; every row was
            # checked against max_length before training (trainer/data.py), so TRL need not enforce it
            own["max_length"] = None
        return own


def run_sft(cfg: SFTSettings) -> dict[str, Any]:
    from trl import SFTTrainer

    from moaa.trainer.runner import build_trainer, callbacks, peft_config, prepare, train_and_save, trainer_datasets

    p = prepare(cfg)
    if isinstance(p, dict):   # the final model of this run is saved: nothing to do
        return p
    trainer = build_trainer(lambda: SFTTrainer(model=p.model, args=p.args, **trainer_datasets(p),
                                               processing_class=p.tokenizer, peft_config=peft_config(cfg),
                                               callbacks=callbacks(p)), p)
    return train_and_save(p, trainer)
