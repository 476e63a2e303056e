"""`moaa backend serve` (a real engine, supervised) and `moaa backend emulate` (no model, faults on demand)."""
from __future__ import annotations

import sys

from moaa.cli import port, positive_int


def register(subparsers) -> None:
    from moaa.services.local.engine import ENGINE_CHOICES

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
    try:
        from moaa.services.emulator.api_router import add_arguments
    except ImportError:  # the emulator is optional for this command group
        add_arguments = None
    if add_arguments is not None:
        add_arguments(emu)
    emu.set_defaults(func=_emulate)


def _announce(server) -> None:
    cfg = server.backend_config().model_dump(mode="json", exclude_none=True)
    print(f"moaa backend: {server.engine} serving {server.served_model_name!r} at {server.base_url} "
          f"(supports_n={str(server.supports_n).lower()}; engine log: {server.log_path})", flush=True)
    print("config entry:", __import__("json").dumps({"backends": {server.served_model_name: cfg}}), flush=True)


async def _serve(args) -> int:
    from moaa.services.local.engine import EngineServer, serve_until_signalled

    server = EngineServer(args.model, engine=args.engine, port=args.port or None, host=args.host,
                          served_model_name=args.served_model_name, max_model_len=args.max_model_len,
                          dtype=args.dtype, startup_timeout_s=args.startup_timeout, log_path=args.log_file)
    print(f"moaa backend: starting {server.engine} for {args.model!r} ...", file=sys.stderr, flush=True)
    return await serve_until_signalled(server, _announce)


async def _emulate(args) -> int:
    from moaa.services.emulator.api_router import run_emulator

    return await run_emulator(args)
