"""Client-side helpers for `moaa generate`: open a channel and render a GenerateStream to a terminal."""
from __future__ import annotations

import sys

import grpc

from moaa.errors import TransientError, UserError
from moaa.services.common.tls import open_channel
from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

_BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND}


def rpc_error(err: grpc.aio.AioRpcError, address: str) -> Exception:
    """A CLI error (one line) for a failed call."""
    msg = f"gateway {address}: {err.code().name}: {err.details()}"
    return UserError(msg) if err.code() in _BAD_INPUT else TransientError(msg)


async def generate(address: str, prompt: str, *, recipe: str = "", system: str | None = None,
                   token: str | None = None, tls_ca: str | None = None, tls: bool = False,
                   timeout: float | None = None, max_tokens: int | None = None, out=None) -> gateway_pb2.GenerateResponse:
    """Stream one MoA call: proposals as they complete, then the aggregated answer as it streams."""
    out = out or sys.stdout
    messages = ([common_pb2.Message(role="system", content=system)] if system else []) + [
        common_pb2.Message(role="user", content=prompt)]
    req = gateway_pb2.GenerateRequest(recipe=recipe, messages=messages)
    if max_tokens:
        req.aggregator_sampling.max_tokens = max_tokens
        req.proposer_sampling.max_tokens = max_tokens
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    final = None
    answering = False
    async with open_channel(address, ca_file=tls_ca, tls=tls) as channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        try:
            async for ev in stub.GenerateStream(req, metadata=metadata, timeout=timeout):
                kind = ev.WhichOneof("event")
                if kind == "proposal":
                    p = ev.proposal
                    out.write(f"--- proposal {p.layer}.{p.index + 1} ({p.model}, {p.latency_s:.2f} s) ---\n"
                              f"{p.text.strip()}\n\n")
                elif kind == "failure":
                    f = ev.failure
                    out.write(f"--- failed: {f.model} ({f.cause}): {f.message} ---\n\n")
                elif kind == "delta":
                    if not answering:
                        out.write("=== aggregated answer ===\n")
                        answering = True
                    out.write(ev.delta.text)
                elif kind == "final":
                    final = ev.final
                out.flush()
        except grpc.aio.AioRpcError as err:
            if answering:
                out.write("\n")
            raise rpc_error(err, address) from None
    if final is not None:
        total = sum(u.usage.total_tokens for u in final.usage)
        out.write(f"\n\n[{final.aggregator_model}, {final.latency.total_s:.2f} s, {total} tokens"
                  + (f", {len(final.failures)} failures" if final.failures else "") + "]\n")
    return final
