"""Where each stage of a run writes, inside the run folder (`--out`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def run_manifest(self) -> Path:
        return self.root / "run.json"

    @property
    def config(self) -> Path:
        return self.root / "moaa.yaml"

    @property
    def usage(self) -> Path:
        return self.root / "usage.json"

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def sft_data(self) -> Path:
        return self.root / "stage1-sft-data"

    @property
    def sft_model(self) -> Path:
        return self.root / "sft-model"

    @property
    def samples(self) -> Path:
        return self.root / "stage2-samples"

    @property
    def pairs(self) -> Path:
        return self.root / "stage2-pairs"

    @property
    def dpo_model(self) -> Path:
        return self.root / "dpo-model"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"
