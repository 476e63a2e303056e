"""The one progress display of every long moaa command: rows done of the total, rate, ETA (tqdm), failures
so far and tokens spent, on stderr (stdout stays the command's data).

On a terminal it is tqdm's bar, redrawn in place. Anywhere else (CI logs, `kubectl logs`, a file) it is
line mode: whole lines, no carriage returns, at most one every LOG_INTERVAL_S plus the first and the last,
so a day-long run leaves a readable log, not thousands of redraws on one line. A resumed run says so first
(how many done, how many left). `--quiet` or $MOAA_LOG_LEVEL=WARNING (or above) turns it off.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Protocol

from tqdm import tqdm

LOG_INTERVAL_S = 30.0   # line mode: one line per this many seconds at most (2 a minute in a pod's log)
TTY_INTERVAL_S = 0.5


class _Tokens(Protocol):
    """What the bar shows of a token ledger (the pipeline's TokenLedger); core imports nothing from the pipeline."""
    def short(self) -> str: ...


def progress_off(quiet: bool = False) -> bool:
    """Whether progress is silenced: --quiet / --no-progress, or $MOAA_LOG_LEVEL asking for warnings only."""
    from moaa.loglevel import env_level

    level = env_level()
    return quiet or (level is not None and level > logging.INFO)


def _terminal(stream) -> bool:
    """A terminal with a width, where a bar is redrawn in place. A pseudo-terminal of 0 columns (a container
    run with -t and no size) made tqdm draw nothing at all: line mode there."""
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError):   # no descriptor to ask: a terminal as it says
        return True


class _Lines:
    """tqdm's in-place redraws as whole lines, for a stream that is not a terminal."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def quiet_progress_bars() -> None:
    """This display is the one: the libraries' own loading, dataset and saving bars would only put
    carriage-return noise into logs and above a one-line error."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # bars that read only this variable (accelerate's tqdm, e.g. TRL's precompute_ref_log_probs)
    os.environ["TQDM_DISABLE"] = "1"
    try:
        import datasets
    except ImportError:   # the trainer's extra; a model folder can be prepared without it
        return
    datasets.disable_progress_bars()


class StageProgress:
    def __init__(self, name: str, total: int, done: int, ledger: "_Tokens | None" = None, unit: str = "row",
                 quiet: bool = False, stream=None, unit_scale: bool = False):
        self.name, self.ledger = name, ledger
        self.counts = not unit_scale   # bytes (a file being extracted) have no failed or skipped items
        self.failures = 0
        self.skipped = 0
        self.t0 = time.monotonic()
        stream = stream if stream is not None else sys.stderr
        off = progress_off(quiet)
        tty = _terminal(stream)
        self.interval = TTY_INTERVAL_S if tty else LOG_INTERVAL_S
        self.stream, self.unit, self.off = stream, unit, off
        self._say_resumed(done, total)
        self.bar = tqdm(total=total, initial=done, desc=name, unit=unit, unit_scale=unit_scale, dynamic_ncols=tty,
                        file=stream if tty else _Lines(stream), disable=off or bool(total and done >= total),
                        mininterval=self.interval, maxinterval=max(10.0, self.interval))
        self._shown = 0.0
        self._post()

    def _say_resumed(self, done: int, total: int | None) -> None:
        if self.off or not total or not done:
            return
        self.stream.write(f"{self.name}: resuming: {min(done, total)} of {total} {self.unit}s done, "
                          f"{total - done} left\n" if done < total else
                          f"{self.name}: all {total} {self.unit}s done in an earlier run; nothing to do\n")
        self.stream.flush()

    def resume_at(self, done: int, total: int | None = None) -> None:
        """A child that learns only after the bar began that it resumes (training from a checkpoint): the
        same line, and the work done before counts as done, not into this run's rate."""
        if total:
            self.bar.total = total
        self._say_resumed(done, total or self.bar.total)
        if not self.bar.disable:
            self.bar.n = self.bar.last_print_n = self.bar.initial = done
            self.bar.refresh()

    def _post(self) -> None:
        if not self.counts:
            return
        post = {"failed": self.failures, "skipped": self.skipped}
        if self.ledger is not None:
            post["tokens"] = self.ledger.short()
        self.bar.set_postfix(post, refresh=False)

    def _show(self) -> None:
        """A redraw that is not a count's (a failure, a new total): at most one per interval, as tqdm's own."""
        if self.bar.disable:
            return
        now = self.bar._time()
        if now - max(self._shown, self.bar.last_print_t) >= self.interval:
            self._shown = now
            self.bar.refresh()

    def advance(self, n: int = 1, *, failed: bool = False, skipped: bool = False) -> None:
        self.failures += int(failed)
        self.skipped += int(skipped)
        self._post()
        if not failed:
            self.bar.update(n)
        else:
            self._show()

    def set_total(self, total: int) -> None:
        self.bar.total = total
        self._show()

    def set(self, value: int, **post) -> None:
        if post:
            self.bar.set_postfix(post, refresh=False)
        if value >= self.bar.n:
            self.bar.update(value - self.bar.n)   # through update: its rate and its bounded redraws
        else:
            self.bar.n = value
            self._show()

    def started(self) -> None:
        """The work starts now: what came before (a model loading) is left out of the rate and the ETA."""
        if not self.bar.disable:
            self.bar.unpause()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> float:
        self.bar.close()
        return time.monotonic() - self.t0
