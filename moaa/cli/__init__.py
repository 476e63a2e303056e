"""The `moaa` command line: one module per command group, each with register(subparsers).

The argument types below check ranges while parsing, so that a bad number exits 2 with a usage line
(argparse's error) instead of failing later with an exception's text.
"""
import argparse


def _positive(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or value == float("inf") or value <= 0:  # not a number, nan, inf, <= 0
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def port(text: str) -> int:
    """A TCP port, 0 = any free port."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 (0 = any free port), got {value}")
    return value


def positive_int(text: str) -> int:
    return _positive(text, int, "a positive whole number")


def positive_float(text: str) -> float:
    return _positive(text, float, "a positive number")


def max_tokens(text: str) -> int:
    """A token count that goes into a request's max_tokens: the wire's uint32 bounds it (the server then
    checks it against the model's context window)."""
    from moaa.services.common.validation import TOKENS_WIRE_BOUND

    value = _positive(text, int, "a positive whole number")
    if value >= TOKENS_WIRE_BOUND:
        raise argparse.ArgumentTypeError(f"expected at most {TOKENS_WIRE_BOUND - 1} tokens, got {value}")
    return value


def resamples(text: str) -> int:
    """Bootstrap resamples: each holds an index array and, for the length-controlled rate, a model fit;
    100000 is ten times a careful interval and still minutes, not an allocator error after the judging."""
    value = _positive(text, int, "a positive whole number")
    if value > 100_000:
        raise argparse.ArgumentTypeError(f"at most 100000 resamples, got {value}")
    return value


def seconds(text: str) -> float:
    """A call's deadline in seconds: positive, and at most a million (gRPC cannot hold a longer deadline)."""
    value = _positive(text, float, "a positive number of seconds")
    if value > 1e6:
        raise argparse.ArgumentTypeError(f"expected at most 1000000 seconds, got {text!r}")
    return value


def samples_per_prompt(text: str) -> int:
    """--n of `moaa sample`: 1..MAX_SAMPLES, the bound the gateway's Sample keeps too."""
    from moaa.services.common.validation import MAX_SAMPLES

    value = _positive(text, int, "a positive whole number")
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(f"at most {MAX_SAMPLES} answers per prompt, got {value}")
    return value


def sampling_value(name: str):
    """An argparse type for a sampling setting, in the range the backends' SamplingConfig takes."""

    def parse(text: str) -> float:
        from pydantic import ValidationError

        from moaa.services.config import SamplingConfig

        try:
            value = float(text)
            SamplingConfig(**{name: value})
        except ValueError as err:   # not a number, or out of range (nan and inf included)
            why = err.errors()[0]["msg"].lower() if isinstance(err, ValidationError) else "expected a number"
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}") from None
        return value

    return parse


def add_service_group(subparsers, kind: str, help_text: str, serve_help: str, serve):
    """`moaa gateway serve` / `moaa annotator serve`: the same flags for both services."""
    group = subparsers.add_parser(kind, help=help_text)
    sub = group.add_subparsers(dest=f"{kind}_command", metavar="SUBCOMMAND")
    sub.required = True
    cmd = sub.add_parser("serve", help=serve_help)
    cmd.add_argument("--config", required=True, help="moaa YAML config")
    cmd.add_argument("--port", type=port, help=f"override {kind}.port (0 = any free port)")
    cmd.add_argument("--host", help=f"override {kind}.host")
    cmd.add_argument("--log-format", choices=["json", "text"], default="json")
    cmd.set_defaults(func=serve)
    return cmd


def add_connection_args(p, what: str) -> None:
    """How to reach a moaa service (token, TLS, mutual TLS): the same flags on every command that calls one."""
    import os

    p.add_argument("--token", default=os.environ.get("MOAA_TOKEN"), help="bearer token (default: $MOAA_TOKEN)")
    p.add_argument("--tls-ca", help=f"CA certificate to verify the TLS certificate of the {what}")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    p.add_argument("--tls-cert", help=f"client certificate, when the {what} requires mutual TLS")
    p.add_argument("--tls-key", help="key of the client certificate")
    p.add_argument("--tls-server-name", help=f"check the {what}'s certificate against this name instead of the "
                   "address's (a headless Service's dns:/// target, whose name the certificate may not hold)")


def add_quiet_arg(p) -> None:
    """No progress display (it is on stderr, in line mode when stderr is not a terminal): the same flag on
    every long command; $MOAA_LOG_LEVEL=WARNING (or above) does the same."""
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress display (also: MOAA_LOG_LEVEL=WARNING)")
