"""Which local inference engine to run: the one rule for `moaa backend serve`, the pipeline's embedded
engine and `moaa sample` (the trainer may import it: it needs nothing but the standard library)."""
from __future__ import annotations

import importlib.util

from moaa.errors import UserError, install_line

ENGINE_CHOICES = ("auto", "vllm", "transformers")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _gpu_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pick_engine(engine: str, *, vllm_on_cpu: bool = True) -> str:
    """auto = vLLM where it is installed, else transformers. `vllm_on_cpu=False` (offline sampling in the
    trainer) also picks transformers when no GPU is visible: vLLM's CPU engine takes longer to start
    than a small sampling job takes to run."""
    if engine not in ENGINE_CHOICES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if engine == "auto":
        engine = "vllm" if vllm_available() and (vllm_on_cpu or _gpu_visible()) else "transformers"
    elif engine == "vllm" and not vllm_available():
        raise UserError(f"engine vllm is not installed here: {install_line('vllm')}, or use --engine transformers")
    if engine == "transformers" and not transformers_available():  # a core install: no engine at all
        raise UserError(f"engine transformers is not installed here: {install_line('transformers')} "
                        f"(or {install_line('vllm')} for vLLM)")
    return engine
