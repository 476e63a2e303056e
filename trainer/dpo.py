"""DPO on MoA-judged preference pairs with TRL's DPOTrainer.

The reference model is loaded explicitly (a second copy, same chat-template fix-ups) rather than
left to TRL, which would reload it from the model's saved path and miss tokens added in memory. With
LoRA there is no second copy: TRL uses the base weights with adapters disabled.
"""
from __future__ import annotations

from typing import Any

from moaa.trainer.config import TrainConfig
from moaa.trainer.data import to_dataset
from moaa.trainer.runner import callbacks, load_model_and_tokenizer, peft_config, prepare, train_and_save


def run_dpo(cfg: TrainConfig) -> dict[str, Any]:
    from trl import DPOTrainer

    p = prepare(cfg)
    ref = None
    if not cfg.lora.enabled:
        ref, _, _ = load_model_and_tokenizer(cfg, p.device)
        ref.eval()
    trainer = DPOTrainer(model=p.model, ref_model=ref, args=p.args, train_dataset=to_dataset(p.rows, cfg.kind),
                         processing_class=p.tokenizer, peft_config=peft_config(cfg), callbacks=callbacks(p))
    return train_and_save(p, trainer)
