"""`moaa generate`: one GenerateStream rendered to a terminal (proposals, failures, the streamed answer)."""
from __future__ import annotations

import asyncio
import sys

import grpc

from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

from .endpoint import Endpoint
from .errors import RETRY_DELAYS_S, call_error, retry_delay


def generate_request(messages: list[dict], *, recipe: str = "",
                     max_tokens: int | None = None) -> gateway_pb2.GenerateRequest:
    """`max_tokens` bounds the proposers' answers and the aggregator's alike."""
    req = gateway_pb2.GenerateRequest(
        recipe=recipe, messages=[common_pb2.Message(role=m["role"], content=m["content"]) for m in messages])
    if max_tokens:
        req.aggregator_sampling.max_tokens = max_tokens
        req.proposer_sampling.max_tokens = max_tokens
    return req


async def generate(ep: Endpoint, prompt: str, *, recipe: str = "", system: str | None = None,
                   timeout: float | None = None, max_tokens: int | None = None, out=None) -> gateway_pb2.GenerateResponse:
    """Stream one MoA call: proposals as they complete, then the aggregated answer as it streams."""
    out = out or sys.stdout
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    req = generate_request(messages, recipe=recipe, max_tokens=max_tokens)
    final = None
    answering = False
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout   # --timeout bounds the retries too
    async with ep.channel() as channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        for tries in range(len(RETRY_DELAYS_S) + 1):
            started = False   # after the first event the output has begun: no retry, it would repeat it
            try:
                async for ev in stub.GenerateStream(
                        req, metadata=ep.metadata, timeout=None if deadline is None else max(0.001, deadline - loop.time())):
                    started = True
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
                break
            except grpc.aio.AioRpcError as err:
                delay = None if started else retry_delay(err, tries)
                if delay is not None and (deadline is None or loop.time() + delay < deadline):
                    await asyncio.sleep(delay)
                    continue
                if answering:
                    out.write("\n")
                hint = (f"--timeout {timeout:g} s passed; give a larger --timeout"
                        if timeout and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "")
                raise call_error(err, f"gateway {ep.address}", hint, tries=tries) from None
    if final is not None:
        total = sum(u.usage.total_tokens for u in final.usage)
        out.write(f"\n\n[{final.aggregator_model}, {final.latency.total_s:.2f} s, {total} tokens"
                  + (f", {len(final.failures)} failures" if final.failures else "") + "]\n")
    return final
