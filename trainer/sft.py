"""Supervised fine-tuning on MoA answers with TRL's SFTTrainer."""
from __future__ import annotations

from typing import Any

from moaa.trainer.config import TrainConfig
from moaa.trainer.data import to_dataset
from moaa.trainer.runner import callbacks, peft_config, prepare, train_and_save


def run_sft(cfg: TrainConfig) -> dict[str, Any]:
    from trl import SFTTrainer

    p = prepare(cfg)
    trainer = SFTTrainer(model=p.model, args=p.args, train_dataset=to_dataset(p.rows, cfg.kind),
                         processing_class=p.tokenizer, peft_config=peft_config(cfg), callbacks=callbacks(p))
    return train_and_save(p, trainer)


