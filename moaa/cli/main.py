"""The `moaa` command. Each command group lives in its own module with a `register(subparsers)`."""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading

# gRPC core logs a refused TLS handshake (and other connection events) to stderr at INFO, beside the one line
# the CLI prints for the failure; errors only, unless the user asks for more (GRPC_VERBOSITY=info|debug).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from moaa import __version__
from moaa.errors import (EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED,
                         MoaaError, missing_extra)

# Command-group modules under moaa.cli, in help order.
COMMAND_MODULES = [
    "backend",      # moaa backend serve | emulate
    "models",       # moaa models prepare | tiny | list
    "gateway",      # moaa gateway serve, moaa generate
    "annotator",    # moaa annotator serve, moaa annotate, moaa judge-eval
    "train",        # moaa train sft | dpo | submit, moaa sample, moaa logprobs
    "pipeline",     # moaa pipeline run, moaa eval
]


class Terminated(KeyboardInterrupt):
    """SIGTERM (a Job deleted, a supervisor stopping us): unwound like Ctrl-C, so `finally` blocks run."""


def _terminated(signum, frame) -> None:
    raise Terminated()


async def _as_main_task(coro, tied: bool):
    """Run an async command so that SIGTERM cancels it as asyncio.run's Ctrl-C does: the main task is
    cancelled and unwinds at an await. Raised from a signal handler, the exception could land inside
    grpc.aio's or aiohttp's callbacks, which turn it into a bare CancelledError (a traceback, exit 1)."""
    if not tied:
        return await coro
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    stopped = []
    loop.add_signal_handler(signal.SIGTERM, lambda: (stopped.append(True), task.cancel()))
    try:
        result = await coro
    except asyncio.CancelledError:
        if stopped:
            raise Terminated() from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _terminated)  # back to the sync rule for whatever runs after
    if stopped:  # the command caught the cancellation and returned: it was still stopped
        raise Terminated()
    return result


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as for every bad input
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moaa", description="Mixture-of-Agents Alignment: data, judges, training.")
    parser.add_argument("--version", action="version", version=f"moaa {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        modname = f"moaa.cli.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).register(subparsers)
    return parser


def _setup_logging(verbosity: int) -> None:
    from moaa.loglevel import env_level

    level = env_level()
    if level is None:
        level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Servers replace it with their graceful stop. Only the main thread may set it (tests call main in
    # threads); torchrun/accelerate workers (LOCAL_RANK, trainer/launch.py is_worker) keep the default,
    # since their launcher stops them with SIGTERM and a worker inside a collective must die at once.
    tied = threading.current_thread() is threading.main_thread() and "LOCAL_RANK" not in os.environ
    previous = signal.signal(signal.SIGTERM, _terminated) if tied else None
    try:
        return _run(args, tied)
    finally:  # main() called in-process (tests, notebooks) leaves the caller's handler as it was
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args, tied: bool) -> int:
    try:
        _setup_logging(args.verbose)
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(_as_main_task(result, tied))
        return int(result or 0)
    except MoaaError as err:
        sys.stderr.write(f"moaa: error: {err}\n")
        return err.exit_code
    except BrokenPipeError:  # `moaa generate ... | head`: the reader is gone; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as err:  # 128 + the signal, as a shell reports a process it stopped
        if isinstance(err, Terminated):
            sys.stderr.write("moaa: terminated (SIGTERM)\n")
            return EXIT_TERMINATED
        sys.stderr.write("moaa: interrupted\n")
        return EXIT_INTERRUPTED
    except (Exception, asyncio.CancelledError) as err:  # the last guard: one line, full trace only with -vv
        if args.verbose >= 2:
            raise
        # a core install running a command of an extra: the line names the extra to install
        hint = missing_extra(err) if isinstance(err, ModuleNotFoundError) else None
        if hint is not None:
            sys.stderr.write(f"moaa: error: {hint}\n")
            return hint.exit_code
        # a library's own cancellation (grpc.aio turns an error in its callbacks into one) says nothing alone
        what = "a call was cancelled inside a library" if isinstance(err, asyncio.CancelledError) else \
            f"{type(err).__name__}: {err}"
        sys.stderr.write(f"moaa: error: {what} (run with -vv for the traceback)\n")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
