"""Progress of one stage: rows done, rate, ETA (tqdm), failures so far and tokens spent."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .budget import TokenLedger


class StageProgress:
    def __init__(self, name: str, total: int, done: int, ledger: TokenLedger | None = None, unit: str = "row",
                 quiet: bool = False):
        self.name, self.ledger = name, ledger
        self.failures = 0
        self.skipped = 0
        self.t0 = time.monotonic()
        self.bar = tqdm(total=total, initial=done, desc=name, unit=unit, dynamic_ncols=True, file=sys.stderr,
                        disable=quiet, mininterval=0.5)
        self._post()

    def _post(self) -> None:
        post = {"failed": self.failures, "skipped": self.skipped}
        if self.ledger is not None:
            post["tokens"] = self.ledger.short()
        self.bar.set_postfix(post, refresh=False)

    def advance(self, n: int = 1, *, failed: bool = False, skipped: bool = False) -> None:
        self.failures += int(failed)
        self.skipped += int(skipped)
        self._post()
        if not failed:
            self.bar.update(n)
        else:
            self.bar.refresh()

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self.bar.refresh()

    def set(self, value: int, **post) -> None:
        self.bar.n = value
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.t0
