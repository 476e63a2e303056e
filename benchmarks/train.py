"""SFT throughput benchmark: tokens/s and model FLOPs utilisation (MFU) of moaa's TRL SFT path.

    python benchmarks/train.py                       # CPU, the tiny model built on the fly
    python benchmarks/train.py --model DIR --device cuda --max-length 2048 --per-device-batch-size 8

MFU is model FLOPs per second (6 x params + 12 x layers x hidden x seq per token: forward and backward,
PaLM appendix B) divided by a bound measured IN THE SAME RUN on the same device: the best dense matmul
rate this torch reaches (fp32 on CPU, bf16 on GPU). On a GPU the ratio to the card's nominal dense
bf16 peak is printed too. Settings and results are printed as one JSON object.

On a CPU shared with other work, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads slow steps
several-fold (the setting is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def matmul_bound_tflops(device: str, dtype, size: int, seconds: float = 2.0) -> float:
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    sync()
    return 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e12


def synthetic_rows(n: int, words: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = "the a model answer data train token step loss batch paris water light number list".split()
    return [{"id": f"b{i}", "messages": [
        {"role": "user", "content": " ".join(rng.choice(vocab) for _ in range(16))},
        {"role": "assistant", "content": " ".join(rng.choice(vocab) for _ in range(words))}]} for i in range(n)]


def model_flops_per_token(config, n_params: int, seq: int) -> float:
    c = config.get_text_config()
    return 6 * n_params + 12 * c.num_hidden_layers * c.hidden_size * seq


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model folder (default: build the tiny test model)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps timed (after --warmup)")
    p.add_argument("--warmup", type=int, default=3, help="steps not timed")
    p.add_argument("--per-device-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--packing", action="store_true", help="TRL bfd packing (padding-free on GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--matmul-size", type=int, default=0, help="matmul bound size (default 1024 CPU, 8192 GPU)")
    args = p.parse_args(argv)

    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from moaa.trainer.config import load_train_config, resolve_device
    from moaa.trainer.data import to_dataset
    from moaa.trainer.runner import prepare

    work = Path(tempfile.mkdtemp(prefix="moaa-bench-"))
    model = args.model
    if not model:
        from moaa.services.local.tiny import build_tiny_model

        model = str(build_tiny_model(work / "tiny", hidden_size=256, layers=4, heads=8))
    total = args.warmup + args.steps
    global_batch = args.per_device_batch_size * args.grad_accum
    data = work / "bench.jsonl"
    rows = synthetic_rows(global_batch * total, words=max(8, args.max_length // 2))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_train_config("sft", None, ["warmup_steps=0", "trl.truncation_mode=keep_start"],
                            model=model, data=str(data), out=str(work / "out"), max_steps=total,
                            global_batch_size=global_batch, per_device_batch_size=args.per_device_batch_size,
                            max_length=args.max_length, packing=args.packing, save_steps=10 ** 6,
                            gradient_checkpointing=args.gradient_checkpointing, device=args.device,
                            drop_overlong=False, learning_rate=1e-5, lr_scheduler_type="constant")
    # rows are made longer than max_length on purpose: TRL truncates them, every sequence is full
    cfg = cfg.model_copy(update={"max_length": 10 ** 6})
    pre = prepare(cfg)
    pre.args.max_length = args.max_length
    device = resolve_device(cfg)

    class Timer(TrainerCallback):
        def __init__(self):
            self.t0 = self.t1 = None
            self.tokens0 = 0

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t0, self.tokens0 = time.perf_counter(), trainer.state.num_input_tokens_seen
            if state.global_step == total:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.t1 = time.perf_counter()

    timer = Timer()
    pre.args.include_num_input_tokens_seen = "non_padding"
    trainer = SFTTrainer(model=pre.model, args=pre.args, train_dataset=to_dataset(pre.rows, "sft"),
                         processing_class=pre.tokenizer, callbacks=[timer])
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    elapsed = timer.t1 - timer.t0
    tokens = trainer.state.num_input_tokens_seen - timer.tokens0
    n_params = sum(p.numel() for p in pre.model.parameters())
    flops_tok = model_flops_per_token(pre.model.config, n_params, args.max_length)
    achieved = tokens / elapsed * flops_tok / 1e12
    dtype = torch.bfloat16 if pre.args.bf16 else torch.float32
    bound = matmul_bound_tflops(device, dtype, args.matmul_size or (8192 if device == "cuda" else 1024))
    result = {"tokens_per_s": round(tokens / elapsed, 1), "step_time_s": round(elapsed / args.steps, 4),
              "tokens_timed": tokens, "params": n_params, "model_flops_per_token": flops_tok,
              "achieved_tflops": round(achieved, 4), "matmul_bound_tflops": round(bound, 3),
              "mfu_vs_matmul_bound": round(achieved / bound, 4)}
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    if gpu:
        peak = next((v for k, v in NOMINAL_BF16_TFLOPS.items() if k in gpu), None)
        if peak:
            result.update(nominal_bf16_tflops=peak, mfu_vs_nominal=round(achieved / peak, 4))
    settings = {"model": model if args.model else "tiny (hidden 256, 4 layers, built on the fly)", "device": device,
                "gpu": gpu, "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "max_length": args.max_length, "per_device_batch_size": args.per_device_batch_size,
                "grad_accum": args.grad_accum, "packing": args.packing,
                "gradient_checkpointing": args.gradient_checkpointing, "steps_timed": args.steps,
                "warmup_steps": args.warmup, "trl": __import__("trl").__version__,
                "torch": torch.__version__}
    print(json.dumps({"benchmark": "train_sft", "settings": settings, "results": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
