"""The gateway's side of annotation: the channel to the annotator service and the one call that scores
candidates with the judge ensemble, used by Sample(annotate) and Generate(annotate)."""
from __future__ import annotations

import grpc

from moaa.client.endpoint import Endpoint, forwarded_auth
from moaa.prompts import answer_key
from moaa.services.common.errors import FailedPrecondition, InvalidArgument, RpcError
from moaa.services.config import MoaaConfig
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2, gateway_pb2


class AnnotatorClient:
    """A lazily opened channel to the annotator (an Endpoint of the one client package); the caller's
    bearer token is passed on with each call."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.address = endpoint.address
        self._channel = None

    def stub(self) -> annotator_pb2_grpc.AnnotatorStub:
        if self._channel is None:
            self._channel = self.endpoint.channel()
        return annotator_pb2_grpc.AnnotatorStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def check_annotate(cfg: MoaaConfig, annotate: bool, ensemble: str) -> None:
    """What annotate=true needs from the gateway's config and the request; an ensemble without annotate
    would be ignored, so it is refused."""
    if not annotate:
        if ensemble:
            raise InvalidArgument(f"ensemble={ensemble!r} is set but annotate is false: set annotate=true to have "
                                  "the judge ensemble score the answers, or leave ensemble empty")
        return
    if not cfg.annotator_address:
        raise FailedPrecondition("annotate=true needs annotator_address in the gateway's config")
    if ensemble and ensemble not in cfg.ensembles:
        raise InvalidArgument(f"unknown ensemble {ensemble!r}: use one of "
                              f"{', '.join(sorted(cfg.ensembles)) or 'none (configure ensembles)'}")


async def annotate(annotator: AnnotatorClient, request: annotator_pb2.AnnotateRequest, *, timeout: float | None,
                   metadata=()) -> annotator_pb2.AnnotateResponse:
    """One Annotate call; the caller's bearer token goes with it. Raises RpcError with the annotator's status
    (the gateway answers its own callers with gRPC statuses, not the CLI's errors)."""
    try:
        return await annotator.stub().Annotate(request, timeout=timeout, metadata=forwarded_auth(metadata))
    except grpc.aio.AioRpcError as err:
        raise RpcError(f"annotator at {annotator.address}: {err.details()}", err.code()) from None


def moa_candidates(resp: gateway_pb2.GenerateResponse) -> list[annotator_pb2.Candidate]:
    """The last layer's proposals and the aggregated answer, as candidates to judge against each other: each
    text once (an aggregate that copies a proposal is kept as the aggregate; the annotator refuses a pair of
    one text)."""
    last = resp.layers[-1].proposals if resp.layers else []
    cands = {answer_key(resp.text): annotator_pb2.Candidate(id="aggregate", text=resp.text, model=resp.aggregator_model)}
    for p in last:
        cands.setdefault(answer_key(p.text), annotator_pb2.Candidate(id=f"L{p.layer}-P{p.index}", text=p.text,
                                                                 model=p.model))
    aggregate = cands.pop(answer_key(resp.text))
    return [*cands.values(), aggregate]   # proposals in order, then the aggregate


async def annotate_into(annotator: AnnotatorClient, request: annotator_pb2.AnnotateRequest, resp, *,
                        timeout: float | None, metadata=()) -> None:
    """Fill resp.annotation (a GenerateResponse or a SampleResponse). An annotator that fails, or refuses the
    candidates, is recorded in resp.failures (model "annotator", its status as the cause) and the answers are
    kept: they were paid for, and failing the call would have the client pay for them again."""
    try:
        resp.annotation.CopyFrom(await annotate(annotator, request, timeout=timeout, metadata=metadata))
    except RpcError as err:
        resp.failures.append(common_pb2.BackendError(model="annotator", cause=err.code.name.lower(),
                                                     message=str(err)))


async def annotate_moa(annotator: AnnotatorClient, request: gateway_pb2.GenerateRequest,
                       resp: gateway_pb2.GenerateResponse, *, timeout: float | None, metadata=()) -> None:
    """Fill resp.annotation with the judges' pair of the last layer's proposals and the aggregate."""
    cands = moa_candidates(resp)
    total = (len(resp.layers[-1].proposals) if resp.layers else 0) + 1
    if len(cands) < 2:   # nothing to compare: a skip, as `moaa annotate` records it, no annotator call
        resp.annotation.CopyFrom(annotator_pb2.AnnotateResponse(
            request_id=resp.request_id, skipped=True, ensemble=request.ensemble,
            skip_reason=f"too_few_candidates: {len(cands)} distinct answers of {total}"))
        return
    areq = annotator_pb2.AnnotateRequest(request_id=resp.request_id, prompt=request.messages,
                                         ensemble=request.ensemble, candidates=cands)
    await annotate_into(annotator, areq, resp, timeout=timeout, metadata=metadata)
