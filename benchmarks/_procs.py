"""What the benchmark scripts share: server processes that report where they listen, JSON figures."""
from __future__ import annotations

import json
import multiprocessing as mp


def spawn(target, *args, timeout_s: float = 60.0):
    """Start `target(*args, queue)` in a fresh (spawned) process; returns (process, the first value it
    puts on the queue: its URL or port)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q), daemon=True)
    proc.start()
    return proc, q.get(timeout=timeout_s)


def write_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=1)
