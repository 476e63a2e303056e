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

from moaa import __version__
from moaa.errors import (EXIT_BAD_INPUT, EXIT_BROKEN_PIPE, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED,
                         MoaaError)

# Command-group modules under moaa.cli, in help order.
COMMAND_MODULES = [
    "backend",      # moaa backend serve | emulate
    "models",       # moaa models prepare | tiny | list
    "gateway",      # moaa gateway serve, moaa generate
    "annotator",    # moaa annotator serve, moaa annotate, moaa judge-eval
    "train",        # moaa train sft | dpo | submit, moaa sample, moaa logprobs
    "pipeline",     # moaa pipeline run, moaa eval
]


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
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbosity, 2)]
    level = getattr(logging, os.environ.get("MOAA_LOG_LEVEL", "").upper(), level)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread: the command unwinds (its finally blocks run) as for Ctrl-C and ends with
    one line; left at Python's default, SIGTERM ended it silently. Servers install their own handlers."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers can only be set there
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    try:
        result = args.func(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except MoaaError as err:
        sys.stderr.write(f"moaa: error: {err}\n")
        return err.exit_code
    except BrokenPipeError:  # `moaa generate ... | head`: the reader is gone; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        sys.stderr.write("moaa: interrupted\n")
        return EXIT_INTERRUPTED
    except Terminated:
        sys.stderr.write("moaa: terminated\n")
        return EXIT_TERMINATED
    except Exception as err:  # the last guard: one line, full trace only with -vv
        if args.verbose >= 2:
            raise
        sys.stderr.write(f"moaa: error: {type(err).__name__}: {err} (run with -vv for the traceback)\n")
        return EXIT_FAILURE
    finally:
        if in_main:  # main() called in-process (tests, notebooks) leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
