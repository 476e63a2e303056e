"""`moaa gateway serve` and `moaa generate`."""
from __future__ import annotations

from moaa.cli import add_connection_args, add_service_group, max_tokens, seconds


def register(subparsers) -> None:
    serve = add_service_group(subparsers, "gateway", "the MoA gateway (gRPC, and OpenAI-compatible HTTP)",
                              "serve MoAGateway (gRPC) and /v1/chat/completions (HTTP) with the backends and "
                              "recipes of a config", _serve)
    http = serve.add_mutually_exclusive_group()
    http.add_argument("--http-port", type=int, help="override gateway.http_port (OpenAI-compatible HTTP; 0 = any free port)")
    http.add_argument("--no-http", action="store_true", help="serve gRPC only (gateway.http_port: null)")

    gen = subparsers.add_parser("generate", help="one MoA answer from a running gateway, streamed")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--gateway", default="127.0.0.1:50051", help="HOST:PORT of the gateway")
    gen.add_argument("--recipe", default="", help="recipe name (default: the gateway's default)")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--max-tokens", type=max_tokens, help="max tokens per proposer and for the aggregator")
    gen.add_argument("--timeout", type=seconds, default=600.0, help="deadline of the call in seconds")
    add_connection_args(gen, "gateway")
    gen.set_defaults(func=_generate)


async def _serve(args) -> int:
    from moaa.errors import UserError
    from moaa.services.common.logs import configure_logging, serving_level
    from moaa.services.config import load_server_config
    from moaa.services.gateway.server import serve

    cfg = load_server_config(args.config, "gateway", host=args.host, port=args.port)
    if args.no_http:
        cfg.gateway.http_port = None
    elif args.http_port is not None:
        if not 0 <= args.http_port <= 65535:
            raise UserError(f"--http-port {args.http_port} is out of range: use 0..65535")
        cfg.gateway.http_port = args.http_port
    configure_logging(serving_level(), json_lines=args.log_format == "json")
    return await serve(cfg)


async def _generate(args) -> int:
    from moaa.client.endpoint import Endpoint
    from moaa.client.generate import generate

    await generate(Endpoint.reached_as(args.gateway, args), args.prompt, recipe=args.recipe, system=args.system, timeout=args.timeout,
                   max_tokens=args.max_tokens)
    return 0
