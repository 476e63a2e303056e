"""`python -m moaa.pipeline.serve gateway|annotator --config FILE`: one service as a child process.

The embedded pipeline runs the gateway and the annotator as separate local processes, exactly as
`moaa gateway serve` / `moaa annotator serve` would, through the services' own start functions.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import signal
import sys


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the pipeline
    except OSError:
        pass


async def _main(kind: str, config_path: str) -> None:
    from moaa.services.config import load_config

    cfg = load_config(config_path)
    if kind == "gateway":
        from moaa.services.gateway.server import start_gateway

        running = await start_gateway(cfg)
    else:
        from moaa.services.annotator.server import start_annotator

        running = await start_annotator(cfg)
    print(f"moaa {kind} listening on {running.address}", flush=True)
    await running.wait_for_signal()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moaa.pipeline.serve")
    p.add_argument("kind", choices=["gateway", "annotator"])
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    _die_with_parent()
    try:
        asyncio.run(_main(args.kind, args.config))
    except KeyboardInterrupt:
        pass
    except Exception as err:  # one line for the parent's error message
        print(f"moaa: error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
