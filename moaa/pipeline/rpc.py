"""Dataset work over gRPC: GenerateBatch (stage 1) and AnnotateStream (stage 2), written row by row.

Both calls are bidirectional streams. gRPC sends queued requests as fast as HTTP/2 allows, so the
client keeps its own window: a new row is fed only when a result came back. A budget stop therefore
stops feeding new rows within one window; the rows in flight finish and are written (their tokens
are already spent).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterable

import grpc

from moaa.errors import TransientError, UserError
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2, gateway_pb2, gateway_pb2_grpc

from .budget import TokenLedger
from .progress import StageProgress
from .store import DatasetStore

_BAD_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
              grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}


@dataclass
class Endpoint:
    address: str
    token: str | None = None
    tls_ca: str | None = None

    @property
    def metadata(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def channel(self) -> grpc.aio.Channel:
        from moaa.services.common.tls import open_channel

        opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        return open_channel(self.address, ca_file=self.tls_ca, options=opts)


def call_error(err: grpc.aio.AioRpcError, what: str, address: str) -> Exception:
    msg = f"{what} at {address}: {err.code().name}: {err.details()}"
    return UserError(msg) if err.code() in _BAD_INPUT else TransientError(msg)


def messages_pb(msgs: list[dict]) -> list[common_pb2.Message]:
    return [common_pb2.Message(role=m["role"], content=m["content"]) for m in msgs]


def _sampling(max_tokens: int | None) -> common_pb2.SamplingParams:
    sp = common_pb2.SamplingParams()
    if max_tokens:
        sp.max_tokens = max_tokens
    return sp


async def generate_batch(ep: Endpoint, rows: Iterable[Any], store: DatasetStore, ledger: TokenLedger,
                         progress: StageProgress, *, recipe: str = "", max_tokens: int | None = None,
                         stage: str = "sft_data", window: int = 32) -> None:
    """Stage 1: one MoA answer per prompt row -> SFT rows {id, messages, moa} in `store`."""
    by_id = {r.id: r for r in rows}
    slots = asyncio.Semaphore(window)

    async def items() -> AsyncIterator[gateway_pb2.BatchItem]:
        for row in by_id.values():
            await slots.acquire()
            if ledger.exhausted():
                return
            req = gateway_pb2.GenerateRequest(recipe=recipe, messages=messages_pb(row.messages),
                                              aggregator_sampling=_sampling(max_tokens),
                                              proposer_sampling=_sampling(max_tokens))
            yield gateway_pb2.BatchItem(id=row.id, request=req)

    async with ep.channel() as channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        try:
            async for res in stub.GenerateBatch(items(), metadata=ep.metadata):
                slots.release()
                row = by_id.get(res.id)
                if row is None:
                    continue
                if res.WhichOneof("result") == "error":
                    store.fail(res.id, f"{res.error.code}: {res.error.message}")
                    progress.advance(failed=True)
                    continue
                r = res.response
                ledger.add_model_usages(stage, r.usage)
                if not r.text.strip():
                    store.fail(res.id, f"empty answer from the aggregator ({r.finish_reason or 'no reason'})")
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
                }, models=models)
                progress.advance()
        except grpc.aio.AioRpcError as err:
            raise call_error(err, "gateway GenerateBatch", ep.address) from None
        finally:
            ledger.save()


def sample_texts(row: dict) -> list[str]:
    """The candidate answers of a samples row, whatever the sampler named them."""
    items = row.get("candidates") or row.get("samples") or row.get("completions") or row.get("answers") or []
    out = []
    for it in items:
        if isinstance(it, str):
            out.append(it)
        elif isinstance(it, dict):
            out.append(it.get("text") or it.get("content") or "")
    return out


def sample_prompt(row: dict) -> list[dict]:
    return row.get("prompt") or row.get("messages")


def prepare_candidates(texts: list[str]) -> tuple[list[int], str | None]:
    """Indices of the usable candidates (non-empty, distinct), or a skip reason."""
    keep, seen = [], set()
    for i, t in enumerate(texts):
        key = t.strip()
        if key and key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < 2:
        return keep, f"too_few_candidates: {len(keep)} distinct non-empty answers of {len(texts)}"
    return keep, None


async def annotate_stream(ep: Endpoint, rows: list[dict], store: DatasetStore, ledger: TokenLedger,
                          progress: StageProgress, *, ensemble: str = "", mode: str = "", model: str = "sft",
                          stage: str = "pairs", window: int = 16) -> None:
    """Stage 2: candidates per prompt -> preference rows {id, prompt, chosen, rejected, scores...}."""
    todo: dict[str, tuple[dict, list[int]]] = {}
    for row in rows:
        texts = sample_texts(row)
        keep, reason = prepare_candidates(texts)
        if reason:
            store.skip(row["id"], reason)
            progress.advance(skipped=True)
        else:
            todo[row["id"]] = (row, keep)

    slots = asyncio.Semaphore(window)

    async def items() -> AsyncIterator[annotator_pb2.AnnotateRequest]:
        for rid, (row, keep) in todo.items():
            await slots.acquire()
            if ledger.exhausted():
                return
            texts = sample_texts(row)
            yield annotator_pb2.AnnotateRequest(
                id=rid, prompt=messages_pb(sample_prompt(row)), ensemble=ensemble, mode=mode,
                candidates=[annotator_pb2.Candidate(id=f"s{i}", text=texts[i], model=model) for i in keep])

    if not todo:
        return
    async with ep.channel() as channel:
        stub = annotator_pb2_grpc.AnnotatorStub(channel)
        try:
            async for res in stub.AnnotateStream(items(), metadata=ep.metadata):
                slots.release()
                if res.id not in todo:
                    continue
                row, keep = todo[res.id]
                if res.WhichOneof("result") == "error":
                    store.fail(res.id, f"{res.error.code}: {res.error.message}")
                    progress.advance(failed=True)
                    continue
                r = res.response
                ledger.add_model_usages(stage, r.usage)
                if r.skipped:
                    store.skip(res.id, r.skip_reason or "skipped by the annotator", margin=r.margin,
                               agreement=r.agreement)
                    progress.advance(skipped=True)
                    continue
                store.write(pair_row(row, keep, r), models=[model] + [j.model for j in r.judges])
                progress.advance()
        except grpc.aio.AioRpcError as err:
            raise call_error(err, "annotator AnnotateStream", ep.address) from None
        finally:
            ledger.save()


def pair_row(row: dict, keep: list[int], r: annotator_pb2.AnnotateResponse) -> dict:
    texts = sample_texts(row)
    text_of = {f"s{i}": texts[i] for i in keep}
    order = [f"s{i}" for i in keep]
    judge_scores = {}
    for j in r.judges:
        by_cand = {s.candidate_id: (None if s.abstained else s.score) for s in j.scores}
        judge_scores[j.judge] = [by_cand.get(cid) for cid in order]
    return {
        "id": row["id"],
        "prompt": sample_prompt(row),
        "chosen": [{"role": "assistant", "content": text_of[r.chosen_id]}],
        "rejected": [{"role": "assistant", "content": text_of[r.rejected_id]}],
        "chosen_id": r.chosen_id,
        "rejected_id": r.rejected_id,
        "score_chosen": next((c.score for c in r.combined if c.candidate_id == r.chosen_id), None),
        "score_rejected": next((c.score for c in r.combined if c.candidate_id == r.rejected_id), None),
        "margin": r.margin,
        "agreement": r.agreement,
        "candidates": order,
        "combined": {c.candidate_id: c.score for c in r.combined},
        "judge_scores": judge_scores,
        "ensemble": r.ensemble,
        "mode": r.mode,
    }


async def annotate_one(stub, ep: Endpoint, prompt: list[dict], cands: list[tuple[str, str]], *,
                       ensemble: str = "", mode: str = "", seed: int | None = None) -> annotator_pb2.AnnotateResponse:
    req = annotator_pb2.AnnotateRequest(prompt=messages_pb(prompt), ensemble=ensemble, mode=mode,
                                        candidates=[annotator_pb2.Candidate(id=cid, text=t) for cid, t in cands])
    if seed is not None:
        req.seed = seed
    try:
        return await stub.Annotate(req, metadata=ep.metadata)
    except grpc.aio.AioRpcError as err:
        raise call_error(err, "annotator Annotate", ep.address) from None

