"""What the benchmark scripts share: server processes that report where they listen, JSON figures."""
from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os


def spawn(target, *args, timeout_s: float = 60.0):
    """Start `target(*args, queue)` in a fresh (spawned) process; returns (process, the first value it
    puts on the queue: its URL or port)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, q), daemon=True)
    proc.start()
    return proc, q.get(timeout=timeout_s)


def run_emulator(settings: dict, profiles: dict | None, q) -> None:
    """The one emulated backend of every benchmark, in its own process: `spawn(run_emulator, {settings},
    {model: overrides})` returns its URL."""
    from moaa.services.emulator import Emulator, EmulatorSettings

    async def main():
        emu = Emulator(EmulatorSettings(**settings), profiles or {})
        await emu.start()
        q.put(emu.url)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_server(which: str, cfg: dict, reply: tuple[str, ...], q) -> None:
    """A gateway or an annotator from a config dict, in its own process, set up as the CLI's serve commands
    do: `spawn(run_server, "gateway", cfg, ("address",))` returns the running server's `address` (several
    names: a tuple of their values)."""
    import logging

    from moaa.services.annotator.server import start_annotator
    from moaa.services.common.server import tune_gc_for_serving
    from moaa.services.config import parse_config
    from moaa.services.gateway.server import start_gateway

    logging.basicConfig(level=logging.WARNING)

    async def main():
        config = parse_config(cfg)
        running = await (start_gateway(config, probes=False) if which == "gateway"
                         else start_annotator(config, port=0, probes=False))
        values = tuple(getattr(running, name) for name in reply)
        q.put(values[0] if len(values) == 1 else values)
        tune_gc_for_serving()  # as `moaa gateway|annotator serve` does once it serves
        await asyncio.Event().wait()

    asyncio.run(main())


def write_json(path: str | None, obj) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(obj, fh, indent=1)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc). CPU time, unlike wall time, barely changes
    with other load on the machine: the benchmarks' per-request cost figures use it."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
