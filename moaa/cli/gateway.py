"""`moaa gateway serve` and `moaa generate`."""
from __future__ import annotations

import logging
import os

from moaa.cli import add_service_group, positive_float, positive_int


def register(subparsers) -> None:
    add_service_group(subparsers, "gateway", "the MoA gateway (gRPC)",
                      "serve MoAGateway with the backends and recipes of a config", _serve)

    gen = subparsers.add_parser("generate", help="one MoA answer from a running gateway, streamed")
    gen.add_argument("prompt", help="the user message")
    gen.add_argument("--gateway", default="127.0.0.1:50051", help="HOST:PORT of the gateway")
    gen.add_argument("--recipe", default="", help="recipe name (default: the gateway's default)")
    gen.add_argument("--system", help="system message")
    gen.add_argument("--max-tokens", type=positive_int, help="max tokens per proposer and for the aggregator")
    gen.add_argument("--timeout", type=positive_float, default=600.0, help="deadline of the call in seconds")
    gen.add_argument("--token", default=os.environ.get("MOAA_TOKEN"), help="bearer token (default: $MOAA_TOKEN)")
    gen.add_argument("--tls-ca", help="CA certificate to verify the gateway's TLS certificate")
    gen.add_argument("--tls", action="store_true", help="use TLS with the system's trusted CAs")
    gen.set_defaults(func=_generate)


async def _serve(args) -> int:
    from moaa.services.common.logs import configure_logging
    from moaa.services.config import load_server_config
    from moaa.services.gateway.server import serve

    cfg = load_server_config(args.config, "gateway", host=args.host, port=args.port)
    configure_logging(min(logging.getLogger().level, logging.INFO), json_lines=args.log_format == "json")
    await serve(cfg)
    return 0


async def _generate(args) -> int:
    from moaa.services.gateway.client import generate

    await generate(args.gateway, args.prompt, recipe=args.recipe, system=args.system, token=args.token,
                   tls_ca=args.tls_ca, tls=args.tls, timeout=args.timeout, max_tokens=args.max_tokens)
    return 0
