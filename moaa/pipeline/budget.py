"""Token accounting per backend model, per stage and per run, from the backends' own usage reports.

The ledger lives in the run folder (`usage.json`) and survives re-runs, so `--token-budget N` bounds
everything a run folder has spent, across restarts. When the budget is reached the runner stops
taking new rows, lets the rows in flight finish and be written, and exits with EXIT_BUDGET: re-running
with a larger budget continues where it stopped.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable

from moaa.errors import MoaaError
from moaa.files import atomic_write_json, read_json
from moaa.usage import add_usage, usage_tokens


EXIT_BUDGET = 3


class BudgetExhausted(MoaaError):
    """The token budget is spent; the run stopped cleanly and can be resumed with a larger budget."""

    exit_code = EXIT_BUDGET


class TokenLedger:
    def __init__(self, path: str | Path | None = None, budget: int | None = None):
        self.path = Path(path) if path else None
        self.budget = budget
        self._lock = threading.Lock()
        # stage -> model -> {"prompt_tokens", "completion_tokens", "requests"}
        self.stages: dict[str, dict[str, dict[str, int]]] = {}
        if self.path:
            self.stages = (read_json(self.path) or {}).get("stages", {})

    def add(self, stage: str, model: str, usage: Any, requests: int = 1) -> None:
        with self._lock:
            add_usage(self.stages.setdefault(stage, {}), model, *usage_tokens(usage), requests)

    def restore_stage(self, stage: str, journaled: dict[str, dict[str, int]]) -> None:
        """Raise a stage's counts to the tokens journaled with its rows. A run killed before it saved this
        ledger forgets nothing that reached disk; only the rows that were in flight are not counted.
        (Never lowered: rows written before rows carried their usage are only in the saved counts.)"""
        with self._lock:
            models = self.stages.setdefault(stage, {})
            for model, u in journaled.items():
                rec = models.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})
                for k in rec:
                    rec[k] = max(rec[k], int(u.get(k, 0)))

    def add_model_usages(self, stage: str, usages: Iterable[Any]) -> None:
        """From repeated moaa.v1.ModelUsage (gateway and annotator responses)."""
        for mu in usages:
            self.add(stage, mu.model, mu.usage, requests=int(getattr(mu, "requests", 1) or 1))

    # -- totals ----------------------------------------------------------------------------------
    def stage_total(self, stage: str) -> int:
        return sum(r["prompt_tokens"] + r["completion_tokens"] for r in self.stages.get(stage, {}).values())

    @property
    def total(self) -> int:
        return sum(self.stage_total(s) for s in self.stages)

    def per_model(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for models in self.stages.values():
            for model, rec in models.items():
                acc = out.setdefault(model, {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})
                for k in acc:
                    acc[k] += rec[k]
        return out

    def exhausted(self) -> bool:
        return self.budget is not None and self.total >= self.budget

    def check(self, where: str) -> None:
        if self.exhausted():
            self.save()
            raise BudgetExhausted(
                f"token budget of {self.budget} reached ({self.total} tokens used) during {where}; "
                "finished rows are saved: re-run with a larger --token-budget to continue")

    def short(self) -> str:
        """For progress bars: '12.3k tok' or '12.3k/50k tok'."""
        used = _k(self.total)
        return f"{used}/{_k(self.budget)} tok" if self.budget else f"{used} tok"

    def to_json(self) -> dict:
        return {"total_tokens": self.total, "budget": self.budget, "stages": self.stages,
                "per_model": self.per_model(),
                "per_stage": {s: self.stage_total(s) for s in self.stages}}

    def save(self) -> None:
        if self.path:
            with self._lock:
                atomic_write_json(self.path, self.to_json())


def _k(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1000:.1f}k" if n >= 1000 else str(n)
