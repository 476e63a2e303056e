"""`moaa backend serve` (a real engine, supervised) and `moaa backend emulate` (no model, faults on demand)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moaa.services.emulator.protocol import EmulatorSettings

from moaa.cli import port, positive_int
from moaa.engines import ENGINE_CHOICES


def register(subparsers) -> None:
    be = subparsers.add_parser("backend", help="model backends: a real embedded engine, or the emulator")
    bsub = be.add_subparsers(dest="backend_command", metavar="SUBCOMMAND")
    bsub.required = True
    serve = bsub.add_parser("serve", help="serve a model with vLLM or transformers' server, OpenAI-compatible")
    serve.add_argument("--model", required=True,
                       help="packaged name (smollm2-135m-instruct, gemma3-270m), model folder, .gguf file or hub id")
    serve.add_argument("--port", type=port, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                       help="auto = vllm where installed, else transformers")
    serve.add_argument("--served-model-name", help="model name clients send (default: the packaged or folder name)")
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--max-model-len", type=positive_int, default=2048, help="context length (vllm)")
    serve.add_argument("--dtype", default="auto",
                       help="compute dtype (default auto = the weights' own: float32 for prepared models; "
                            "vLLM CPU's bfloat16 path garbles SmolLM2)")
    serve.add_argument("--startup-timeout", type=positive_int, default=600, help="seconds to wait for readiness")
    serve.add_argument("--log-file", help="engine log file (default: a temporary folder, printed at start)")
    serve.set_defaults(func=_serve)

    emu = bsub.add_parser("emulate", help="OpenAI-compatible emulator: no model, configurable latency and faults")
    add_emulator_arguments(emu)
    emu.set_defaults(func=_emulate)


def _announce(server) -> None:
    cfg = server.backend_config().model_dump(mode="json", exclude_none=True)
    print(f"moaa backend: {server.engine} serving {server.served_model_name!r} at {server.base_url} "
          f"(supports_n={str(server.supports_n).lower()}; engine log: {server.log_path})", flush=True)
    print("config entry:", __import__("json").dumps({"backends": {server.served_model_name: cfg}}), flush=True)


async def _serve(args) -> int:
    from pathlib import Path

    from moaa.errors import UserError
    from moaa.services.common.server import check_free
    from moaa.services.local.engine import EngineServer, serve_until_signalled

    if args.log_file and (Path(args.log_file).is_dir() or not Path(args.log_file).parent.is_dir()):
        raise UserError(f"--log-file {args.log_file}: give a file in an existing folder")

    # a server already there would answer the readiness check: "serving" printed, then the engine dies
    check_free(args.host, args.port or None, "--port")
    server = EngineServer(args.model, engine=args.engine, port=args.port or None, host=args.host,
                          served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                          dtype=args.dtype, startup_timeout_s=args.startup_timeout, log_path=args.log_file)
    print(f"moaa backend: starting {server.engine} for {args.model!r} ...", file=sys.stderr, flush=True)
    return await serve_until_signalled(server, _announce)


async def _emulate(args) -> int:
    from moaa.services.common.server import check_free
    from moaa.services.emulator import run_emulator

    settings, profiles = emulator_settings_from_args(args)
    check_free(args.host, args.port, "--port")   # one line naming the flag, not OSError's words
    return await run_emulator(settings, profiles, args.models, args.host, args.port)


# -- `moaa backend emulate`: flags -> typed EmulatorSettings -----------------------------------------
def add_emulator_arguments(parser) -> None:
    from moaa.services.emulator.protocol import EmulatorSettings

    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8000, help="port to listen on (0 = any free port)")
    parser.add_argument("--model", dest="models", action="append", default=None,
                        help="model name to list in /v1/models (repeatable); any name is answered")
    parser.add_argument("--settings", default=None,
                        help='server settings as JSON, e.g. \'{"ttft_s": 0.2, "tokens_per_s": 50}\'')
    parser.add_argument("--profile", action="append", default=[], metavar="MODEL=JSON",
                        help='per-model overrides, e.g. slow={"ttft_s": 5} (repeatable)')
    for name, field in EmulatorSettings.model_fields.items():
        kind = _FLAG_TYPES.get(name)
        if kind is None:
            continue  # error_rates has --error-rate; the rest come through --settings
        metavar = {_bool: "true|false", int: "N", str: "TEXT"}.get(kind, "SECONDS")
        extra = {"choices": ["reject", "queue"], "metavar": None} if name == "overflow" else {}
        metavar = "TOKENS" if name == "tokens_per_s" else metavar
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"emu_{name}", type=kind, default=None,
                            **{"metavar": metavar, **extra}, help=field.description)
    parser.add_argument("--error-rate", action="append", default=[], metavar="STATUS=P",
                        help="inject HTTP STATUS with probability P per request (repeatable), e.g. 500=0.05")


def _bool(text: str) -> bool:
    import argparse

    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_FLAG_TYPES = {
    "ttft_s": float, "ttft_jitter_s": float, "tokens_per_s": float, "echo": _bool, "ignore_n": _bool, "default_max_tokens": int,
    "max_concurrency": int, "overflow": str, "retry_after_s": float, "seed": int, "stall_before_headers": _bool,
    "stall_after_chunks": int, "stall_s": float, "disconnect_after_chunks": int, "malformed_after_chunks": int,
    "error_after_chunks": int, "end_after_chunks": int, "max_model_len": int, "api_key": str, "health_status": int, "record": _bool, "history": int, "judge": _bool,
}


def emulator_settings_from_args(args) -> tuple["EmulatorSettings", dict[str, dict]]:
    """The flags as typed settings and per-model profiles; bad values are a UserError (exit 2)."""
    import json

    from moaa.errors import UserError
    from moaa.services.emulator.protocol import EmulatorSettings, OverrideError, effective_settings

    try:
        fields = json.loads(args.settings) if args.settings else {}
        if not isinstance(fields, dict):
            raise UserError("--settings must be a JSON object")
        for name in EmulatorSettings.model_fields:
            value = getattr(args, f"emu_{name}", None)
            if value is not None:
                fields[name] = value
        rates = dict(fields.get("error_rates") or {})
        for item in args.error_rate:
            status, _, p = item.partition("=")
            try:
                code, prob = int(status), float(p)
            except ValueError:
                code, prob = 0, -1.0
            if not (100 <= code <= 599 and 0 <= prob <= 1):
                raise UserError(f"bad --error-rate {item!r}: use STATUS=P, an HTTP status and P in [0, 1]")
            rates[code] = prob
        if rates:
            fields["error_rates"] = rates
        settings = effective_settings(EmulatorSettings(), fields)
        profiles = {}
        for item in args.profile:
            model, _, data = item.partition("=")
            profile = json.loads(data)
            effective_settings(settings, profile)  # validate now, not on the first request
            profiles[model] = profile
    except (ValueError, OverrideError) as err:
        raise UserError(f"emulator settings: {err}") from None
    return settings, profiles
