"""Dataset work over gRPC: GenerateBatch (stage 1) and AnnotateStream (stage 2), written row by row.

Both calls go through the client package's windowed driver (`moaa.client.window`): a new row is fed
only when a result came back, so a budget stop stops feeding within one window; the rows in flight
finish and are written. Each row carries the tokens it cost (`usage`, journaled in the same fsynced
line), so the ledger of a killed run is rebuilt from its rows (`DatasetStore.usage`).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable

from moaa.client.endpoint import Endpoint
from moaa.client.pairs import annotate_request, pair_row, skip_info, usage_record
from moaa.client.window import windowed
from moaa.errors import UserError
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

from .budget import TokenLedger
from .progress import StageProgress
from .store import DatasetStore


def _sampling(max_tokens: int | None) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams()
    if max_tokens:
        sp.max_tokens = max_tokens
    return sp


async def generate_batch(ep: Endpoint, rows: Iterable[Any], store: DatasetStore, ledger: TokenLedger,
                         progress: StageProgress, *, recipe: str = "", max_tokens: int | None = None,
                         stage: str = "sft_data", window: int = 32) -> None:
    """Stage 1: one MoA answer per prompt row -> SFT rows {id, messages, moa, usage} in `store`."""
    inflight: dict[str, Any] = {}   # only the rows sent and not yet answered: memory does not grow with rows

    def items():
        for row in rows:
            inflight[row.id] = row
            yield gateway_pb2.BatchItem(id=row.id, request=gateway_pb2.GenerateRequest(
                recipe=recipe, messages=[common_pb2.Message(role=m["role"], content=m["content"]) for m in row.messages],
                aggregator_sampling=_sampling(max_tokens), proposer_sampling=_sampling(max_tokens)))
    async with ep.channel() as channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        try:
            async for res in windowed(stub.GenerateBatch, items(), ep=ep, what="gateway GenerateBatch",
                                      window=window, stop=ledger.exhausted):
                row = inflight.pop(res.id, None)
                if row is None:
                    continue
                if res.WhichOneof("result") == "error":
                    store.fail(res.id, f"{res.error.code}: {res.error.message}")
                    progress.advance(failed=True)
                    continue
                r = res.response
                ledger.add_model_usages(stage, r.usage)
                usage = usage_record(r.usage)
                if not r.text.strip():
                    store.fail(res.id, f"empty answer from the aggregator ({r.finish_reason or 'no reason'})",
                               usage=usage)
                    progress.advance(failed=True)
                    continue
                proposals = [{"layer": p.layer, "model": p.model, "used": p.used, "trimmed": p.trimmed}
                             for layer in r.layers for p in layer.proposals]
                models = sorted({p["model"] for p in proposals} | {r.aggregator_model})
                store.write({
                    "id": row.id,
                    "messages": row.messages + [{"role": "assistant", "content": r.text}],
                    "moa": {"recipe": r.recipe, "aggregator": r.aggregator_model, "proposals": proposals,
                            "failures": [f"{f.model}: {f.cause}" for f in r.failures],
                            "finish_reason": r.finish_reason, "latency_s": round(r.latency.total_s, 3)},
                    "usage": usage,
                }, models=models)
                progress.advance()
        finally:
            ledger.save()


async def annotate_stream(ep: Endpoint, rows: Iterable[dict], store: DatasetStore, ledger: TokenLedger,
                          progress: StageProgress, *, ensemble: str = "", mode: str = "", model: str = "sft",
                          stage: str = "pairs", window: int = 16) -> None:
    """Stage 2: candidates per prompt -> preference rows in the one schema (`moaa.client.pairs`).
    Rows are read as they are sent (a 65,000-row samples file never sits in memory); a bad row stops
    the feeding, the rows in flight are still written, then its error is raised."""
    inflight: dict[str, annotator_pb2.AnnotateRequest] = {}
    bad: list[Exception] = []

    def requests():
        for row in rows:
            try:
                req, reason = annotate_request(row, ensemble=ensemble, mode=mode, model=model)
            except UserError as err:  # raised inside gRPC's request iterator it would only cancel the call
                bad.append(err)
                return
            if req is None:
                store.skip(row["id"], reason)
                progress.advance(skipped=True)
                continue
            inflight[req.id] = req
            yield req

    todo = requests()
    first = next(todo, None)
    if first is None:  # nothing to judge: no call (and no annotator needed)
        if bad:
            raise bad[0]
        return
    async with ep.channel() as channel:
        stub = annotator_pb2_grpc.AnnotatorStub(channel)
        try:
            async for res in windowed(stub.AnnotateStream, itertools.chain([first], todo), ep=ep,
                                      what="annotator AnnotateStream", window=window, stop=ledger.exhausted):
                req = inflight.pop(res.id, None)
                if req is None:
                    continue
                if res.WhichOneof("result") == "error":
                    store.fail(res.id, f"{res.error.code}: {res.error.message}")
                    progress.advance(failed=True)
                    continue
                r = res.response
                ledger.add_model_usages(stage, r.usage)
                if r.skipped:
                    store.skip(res.id, r.skip_reason or "skipped by the annotator", **skip_info(req, r))
                    progress.advance(skipped=True)
                    continue
                store.write(pair_row(req, r), models=sorted({c.model for c in req.candidates if c.model}
                                                            | {j.model for j in r.judges}))
                progress.advance()
        finally:
            ledger.save()
    if bad:
        raise bad[0]
