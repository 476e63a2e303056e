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
from moaa.client.generate import generate_request
from moaa.client.pairs import annotate_request, pair_row, skip_info, usage_record
from moaa.client.window import windowed
from moaa.errors import UserError
from moaa.progress import StageProgress
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, gateway_pb2, gateway_pb2_grpc

from .budget import TokenLedger
from .store import DatasetStore


async def generate_batch(ep: Endpoint, rows: Iterable[Any], store: DatasetStore, ledger: TokenLedger,
                         progress: StageProgress, *, recipe: str = "", max_tokens: int | None = None,
                         window: int = 32) -> None:
    """Stage 1: one MoA answer per prompt row -> SFT rows {id, messages, moa, usage} in `store`."""
    inflight: dict[str, Any] = {}   # only the rows sent and not yet answered: memory does not grow with rows

    def items():
        for row in rows:
            inflight[row.id] = row
            yield gateway_pb2.BatchItem(id=row.id, request=generate_request(row.messages, recipe=recipe,
                                                                            max_tokens=max_tokens))

    def write(row, r) -> None:
        usage = usage_record(r.usage)
        if not r.text.strip():
            store.fail(row.id, f"empty answer from the aggregator ({r.finish_reason or 'no reason'})", usage=usage)
            progress.advance(failed=True)
            return
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

    await _drive(ep, gateway_pb2_grpc.MoAGatewayStub, "GenerateBatch", items(), inflight, write, store, ledger,
                 progress, stage="sft_data", what="gateway GenerateBatch", window=window)


async def annotate_stream(ep: Endpoint, rows: Iterable[dict], store: DatasetStore, ledger: TokenLedger,
                          progress: StageProgress, *, ensemble: str = "", model: str = "sft", window: int = 16) -> None:
    """Stage 2: candidates per prompt -> preference rows in the one schema (`moaa.client.pairs`).
    Rows are read as they are sent (a 65,000-row samples file never sits in memory); a bad row stops
    the feeding, the rows in flight are still written, then its error is raised."""
    inflight: dict[str, annotator_pb2.AnnotateRequest] = {}
    bad: list[Exception] = []

    def requests():
        for row in rows:
            try:
                req, reason = annotate_request(row, ensemble=ensemble, model=model)
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
    def write(req, r) -> None:
        if r.skipped:
            store.skip(req.id, r.skip_reason or "skipped by the annotator", **skip_info(req, r))
            progress.advance(skipped=True)
            return
        store.write(pair_row(req, r), models=sorted({c.model for c in req.candidates if c.model}
                                                    | {j.model for j in r.judges}))
        progress.advance()

    await _drive(ep, annotator_pb2_grpc.AnnotatorStub, "AnnotateStream", itertools.chain([first], todo), inflight,
                 write, store, ledger, progress, stage="pairs", what="annotator AnnotateStream", window=window)
    if bad:
        raise bad[0]


async def _drive(ep: Endpoint, stub_class, method: str, items: Iterable, inflight: dict, write,
                 store: DatasetStore, ledger: TokenLedger, progress: StageProgress, *, stage: str, what: str,
                 window: int) -> None:
    """Both stages' loop: an item the server refused as bad input is a rejection (recorded, never resent),
    another per-item error fails its row (retried), an answer's usage is journaled, then
    `write(what was sent, response)`; the ledger is saved however the stream ends."""
    def reject(rid: str, reason: str) -> None:
        if inflight.pop(rid, None) is not None:
            store.reject(rid, reason)
            progress.advance(skipped=True)

    async with ep.channel() as channel:
        call = getattr(stub_class(channel), method)
        try:
            async for res in windowed(call, items, ep=ep, what=what, window=window, stop=ledger.exhausted,
                                      reject=reject):
                sent = inflight.pop(res.id, None)
                if sent is None:
                    continue
                if res.WhichOneof("result") == "error":
                    store.fail(res.id, f"{res.error.code}: {res.error.message}")
                    progress.advance(failed=True)
                    continue
                ledger.add_model_usages(stage, res.response.usage)
                write(sent, res.response)
        finally:
            ledger.save()
