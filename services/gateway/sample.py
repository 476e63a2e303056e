"""Sample: n answers from one model, optionally scored by the annotator service."""
from __future__ import annotations

import time

from moaa.prompts import answer_key
from moaa.services.backend import BackendError
from moaa.services.common.convert import backend_error_proto, empty_answer_proto, usage_proto
from moaa.services.common.errors import InvalidArgument, outage
from moaa.services.common.validation import (MAX_SAMPLES, check_max_tokens, merge_sampling, messages_to_dicts,
                                             sampling_overrides)
from moaa.services.config import MoaaConfig, SamplingConfig
from moaa.services.gateway.annotation import AnnotatorClient, annotate_into, check_annotate
from moaa.v1 import annotator_pb2, gateway_pb2

def check_sample_request(cfg: MoaaConfig, req, max_prompt_chars: int) -> tuple[list[dict], SamplingConfig]:
    if not req.model:
        raise InvalidArgument(f"model is empty: name one of the backends ({', '.join(sorted(cfg.backends))})")
    if req.model not in cfg.backends:
        raise InvalidArgument(f"unknown model {req.model!r}: use one of {', '.join(sorted(cfg.backends))}")
    if not 1 <= req.n <= MAX_SAMPLES:
        raise InvalidArgument(f"n={req.n} is out of range: ask for 1..{MAX_SAMPLES} samples")
    messages = messages_to_dicts(req.messages, max_chars=max_prompt_chars, ends_with_user=False)
    over = sampling_overrides(req.sampling if req.HasField("sampling") else None, field="sampling")
    check_max_tokens(over.get("max_tokens"), model=req.model, field="sampling",
                     context_window=cfg.backends[req.model].context_window)
    if req.annotate and req.n < 2:
        raise InvalidArgument("annotate needs at least 2 samples to compare: set n >= 2")
    check_annotate(cfg, req.annotate, req.ensemble)
    return messages, merge_sampling(SamplingConfig(), over)


async def run_sample(pool, cfg: MoaaConfig, req, request_id: str, *, timeout: float | None,
                     max_prompt_chars: int, annotator: AnnotatorClient | None = None,
                     metadata=(), metrics=None) -> gateway_pb2.SampleResponse:
    messages, sampling = check_sample_request(cfg, req, max_prompt_chars)
    t0 = time.monotonic()
    deadline = None if timeout is None else t0 + timeout
    try:
        # partial_ok: where n goes out as n requests, the samples that answered come back with the
        # failures listed instead of the whole call failing for one lost request
        res = await pool.client(req.model).chat(messages, sampling, n=req.n, timeout=timeout, partial_ok=True)
    except BackendError as err:
        if metrics is not None:   # as Generate's backends are counted: latency, errors by cause
            metrics.backend(req.model, time.monotonic() - t0, cause=err.cause)
        left = None if deadline is None else deadline - time.monotonic()
        raise outage(f"model {req.model!r} failed: {err}", left, "the samples were", refused=err.too_long) from None
    if metrics is not None:
        seconds = time.monotonic() - t0
        metrics.backend(req.model, seconds)
        for err in res.failures:
            metrics.backend(req.model, seconds, cause=err.cause)
        metrics.tokens(req.model, res.usage.prompt_tokens, res.usage.completion_tokens)
    resp = gateway_pb2.SampleResponse(request_id=request_id, id=req.id, model=req.model, note=res.note,
                                      usage=usage_proto(res.usage))
    answered = []
    for c in res.choices:
        if not c.text.strip():  # no answer to train on or to judge: a failure, as an empty proposal is
            resp.failures.append(empty_answer_proto(req.model, res.endpoint, res.attempts, c.finish_reason,
                                                    "sampling.max_tokens"))
            continue
        answered.append(c)
        sample = resp.samples.add(index=c.index, text=c.text, finish_reason=c.finish_reason or "")
        if c.usage is not None:
            sample.usage.CopyFrom(usage_proto(c.usage))
    resp.failures.extend(backend_error_proto(err) for err in res.failures)
    if not answered:   # every sample empty (or failed): the call failed, as when every request fails
        left = None if deadline is None else deadline - time.monotonic()
        why = "; ".join(dict.fromkeys(f"{f.cause}: {f.message}" for f in resp.failures))
        raise outage(f"model {req.model!r} answered none of the {req.n} samples ({why})", left, "the samples were")
    if not req.annotate:
        return resp
    # the judges compare distinct answers; the samples come back whatever the annotation's fate
    distinct = list({answer_key(c.text): c for c in answered}.values())
    if len(distinct) < 2:
        resp.note = "; ".join(filter(None, [resp.note, f"not annotated: {len(answered)} of {req.n} samples "
                                            f"answered, {len(distinct)} distinct; the judges need 2"]))
        return resp
    areq = annotator_pb2.AnnotateRequest(
        request_id=request_id, id=req.id, prompt=req.messages, ensemble=req.ensemble,
        candidates=[annotator_pb2.Candidate(id=str(c.index), text=c.text, model=req.model) for c in distinct])
    await annotate_into(annotator, areq, resp, timeout=timeout, metadata=metadata)
    return resp
