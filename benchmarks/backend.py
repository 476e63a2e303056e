"""Tokens per second of each embedded engine at 1, 4 and 16 concurrent requests, in one run.

    python benchmarks/backend.py [--engines transformers,vllm] [--levels 1,4,16] [--max-tokens 64]

Each engine serves SmolLM2-135M-Instruct (prepared from the packaged GGUF) and is started, warmed up,
measured and stopped before the next one starts (two cores: never both at once). At each level,
`level` requests with a long deterministic answer (temperature 0) go out at once through moaa's own
backend client (streamed, as the gateway uses it); tokens/s = completion tokens of all requests / wall
time. The bound is the same engine at 1 concurrent request in the same run: the ratio column says
how much batching buys. The load average is printed because other processes on the machine skew it.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from _procs import write_json  # benchmarks/ is on sys.path when run as a script
import time

PROMPT = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]


async def _round(client, level: int, max_tokens: int) -> tuple[int, float]:
    sampling = {"max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.monotonic()
    results = await asyncio.gather(*(client.chat(PROMPT, sampling) for _ in range(level)))
    return sum(r.usage.completion_tokens for r in results), time.monotonic() - t0


async def bench_engine(engine: str, model: str, levels: list[int], max_tokens: int, dtype: str) -> list[dict]:
    from moaa.services.backend import BackendPool
    from moaa.services.local.engine import EngineServer

    t0 = time.monotonic()
    async with EngineServer(model, engine=engine, dtype=dtype, startup_timeout_s=900) as srv:
        ready_s = time.monotonic() - t0
        print(f"{engine}: ready in {ready_s:.0f} s", file=sys.stderr, flush=True)
        cfg = srv.backend_config(max_concurrency=max(levels), health={"probe_interval_s": 3600},
                                 timeouts={"total_s": 1800, "first_token_s": 900})
        async with BackendPool({"m": cfg}, probes=False) as pool:
            client = pool.client("m")
            await _round(client, 2, 8)  # warm-up: first requests allocate caches
            rows = []
            for level in levels:
                tokens, wall = await _round(client, level, max_tokens)
                rows.append({"engine": engine, "concurrency": level, "tokens": tokens, "wall_s": wall,
                             "tokens_per_s": tokens / wall, "ready_s": ready_s, "dtype": dtype,
                             "loadavg_1m": os.getloadavg()[0]})
                print(f"{engine} x{level}: {tokens} tokens in {wall:.1f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'engine':<13}{'concurrent':>10}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'vs x1':>8}{'load':>6}")
    base = {r["engine"]: r["tokens_per_s"] for r in rows if r["concurrency"] == 1}
    for r in rows:
        ratio = r["tokens_per_s"] / base[r["engine"]] if r["engine"] in base else float("nan")
        print(f"{r['engine']:<13}{r['concurrency']:>10}{r['tokens']:>8}{r['wall_s']:>9.1f}"
              f"{r['tokens_per_s']:>10.1f}{ratio:>7.1f}x{r['loadavg_1m']:>6.1f}")
    engines = sorted(base)
    if {"vllm", "transformers"} <= set(engines):
        for level in sorted({r["concurrency"] for r in rows}):
            v = next(r for r in rows if r["engine"] == "vllm" and r["concurrency"] == level)
            t = next(r for r in rows if r["engine"] == "transformers" and r["concurrency"] == level)
            print(f"vllm / transformers at x{level}: {v['tokens_per_s'] / t['tokens_per_s']:.1f}x")


def main() -> int:
    from moaa.engines import vllm_available

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="transformers,vllm" if vllm_available() else "transformers")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    rows = []
    for engine in args.engines.split(","):
        rows += asyncio.run(bench_engine(engine, args.model, levels, args.max_tokens, args.dtype))
    print_table(rows)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
