"""`moaa generate`: one GenerateStream rendered to a terminal (proposals, failures, the streamed answer)."""
from __future__ import annotations

import sys

import grpc

from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .endpoint import Endpoint
from .errors import call_error


async def generate(ep: Endpoint, prompt: str, *, recipe: str = "", system: str | None = None,
                   timeout: float | None = None, max_tokens: int | None = None, out=None) -> gateway_pb2.GenerateResponse:
    """Stream one MoA call: proposals as they complete, then the aggregated answer as it streams."""
    out = out or sys.stdout
    messages = ([common_pb2.Message(role="system", content=system)] if system else []) + [
        common_pb2.Message(role="user", content=prompt)]
    req = gateway_pb2.GenerateRequest(recipe=recipe, messages=messages)
    if max_tokens:
        req.aggregator_sampling.max_tokens = max_tokens
        req.proposer_sampling.max_tokens = max_tokens
    final = None
    answering = False
    async with ep.channel() as channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        try:
            async for ev in stub.GenerateStream(req, metadata=ep.metadata, timeout=timeout):
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
            raise call_error(err, f"gateway {ep.address}") from None
    if final is not None:
        total = sum(u.usage.total_tokens for u in final.usage)
        out.write(f"\n\n[{final.aggregator_model}, {final.latency.total_s:.2f} s, {total} tokens"
                  + (f", {len(final.failures)} failures" if final.failures else "") + "]\n")
    return final
