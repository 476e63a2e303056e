"""The MoA engine: proposer layers fanned out concurrently, then the aggregator streamed back.

`MoAEngine.run(plan, deadline)` is an async generator of `GenerateEvent`s: each proposal or failure as
it completes, the aggregator's deltas as the backend streams them, and a final event with the whole
result. A layer ends when all proposers answered, after the first k answers (`first_k`) or at the
layer deadline, whichever comes first; requests still running are then cancelled, which closes their
HTTP streams and frees the backend's slot. Closing the generator (the caller cancelled) cancels
everything in flight the same way.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator


from moaa.services.backend import BackendError
from moaa.services.backend.errors import too_long
from moaa.services.common.convert import backend_error_proto, usage_proto
from moaa.services.common.errors import DeadlineExceeded, InvalidArgument, outage
from moaa.services.common.metrics import Metrics
from moaa.services.config import MoaaConfig
from moaa.services.gateway.context import counter_for, fit_references
from moaa.services.gateway.plan import Agent, Plan
from moaa.services.gateway.prompts import AGGREGATE_INSTRUCTION, build_messages
from moaa.v1 import common_pb2, gateway_pb2


@dataclass
class _Usage:
    """Usage per model over one call."""

    per_model: dict[str, list[int]] = field(default_factory=dict)  # model -> [prompt, completion, requests]

    def add(self, model: str, usage=None, requests: int = 1) -> None:
        row = self.per_model.setdefault(model, [0, 0, 0])
        if usage is not None:
            row[0] += usage.prompt_tokens
            row[1] += usage.completion_tokens
        row[2] += requests

    def to_proto(self) -> list[common_pb2.ModelUsage]:
        return [common_pb2.ModelUsage(model=m, requests=r, usage=common_pb2.Usage(
            prompt_tokens=p, completion_tokens=c, total_tokens=p + c)) for m, (p, c, r) in self.per_model.items()]


def _left(deadline: float | None) -> float | None:
    """Seconds left of the caller's deadline (a time.monotonic() value)."""
    return None if deadline is None else deadline - time.monotonic()


def _error_proto(err: BaseException, model: str) -> common_pb2.BackendError:
    if isinstance(err, BackendError):
        return backend_error_proto(err)
    return common_pb2.BackendError(model=model, cause="malformed", message=f"{type(err).__name__}: {err}")


def _empty_answer(model: str, res, role: str) -> common_pb2.BackendError:
    """A proposer's empty answer: cut at max_tokens before any text (a reasoning model spent them all on its
    reasoning), or ended with none; min_proposers counts answers, so it is a failure."""
    if res.finish_reason == "length":
        return common_pb2.BackendError(model=model, endpoint=res.endpoint, cause="max_tokens", attempts=res.attempts,
                                       message=f"answer cut at max_tokens before any text: raise the recipe's "
                                               f"{role}.sampling.max_tokens (or proposer_sampling.max_tokens)")
    return common_pb2.BackendError(model=model, endpoint=res.endpoint, cause="empty", attempts=res.attempts,
                                   message=f"an empty answer (finish_reason {res.finish_reason or 'none'})")


def _describe(failures) -> str:
    return "; ".join(f"{f.model} ({f.cause}{' HTTP %d' % f.http_status if f.http_status else ''}: {f.message})"
                     for f in failures) or "none"


class MoAEngine:
    def __init__(self, cfg: MoaaConfig, pool, metrics: Metrics | None = None):
        self.cfg = cfg
        self.pool = pool
        self.metrics = metrics

    def outage(self) -> str | None:
        """Why no recipe can be answered now (fewer reachable proposers than its min_proposers, or its
        aggregator unreachable), or None. Drives the health status of the MoAGateway service."""
        why = []
        for name, recipe in self.cfg.recipes.items():
            up = [self.pool.reachable(p.model) for p in recipe.proposers]
            down = sorted({p.model for p, ok in zip(recipe.proposers, up) if not ok})
            if sum(up) < recipe.min_proposers:
                why.append(f"{name}: proposers {', '.join(down)} unreachable, {recipe.min_proposers} needed")
            elif not self.pool.reachable(recipe.aggregator.model):
                why.append(f"{name}: aggregator {recipe.aggregator.model} unreachable")
            else:
                return None
        return "; ".join(why)

    # -- messages ---------------------------------------------------------------------------------

    def _messages(self, plan: Plan, agent: Agent, refs: list[gateway_pb2.Proposal] | None):
        """Messages for one agent; with references fitted to its model's context window."""
        if not refs:
            return build_messages(plan.conversation, agent.system_prompt), None
        backend = self.cfg.backends[agent.model]
        instruction = plan.recipe.aggregate_instruction or AGGREGATE_INSTRUCTION
        fit = fit_references(
            [p.text for p in refs], fixed_messages=build_messages(plan.conversation, agent.system_prompt),
            context_window=backend.context_window, reply_tokens=agent.sampling.max_tokens,
            counter=counter_for(backend.tokenizer), reference_max_tokens=plan.recipe.reference_max_tokens,
            fixed_extra=instruction)
        for p, cut in zip(refs, fit.trimmed_tokens):
            if cut:
                p.trimmed = True
                p.trimmed_tokens = max(p.trimmed_tokens, cut)
        return build_messages(plan.conversation, agent.system_prompt, fit.references, instruction), fit

    # -- one proposer -----------------------------------------------------------------------------

    async def _propose(self, agent: Agent, messages: list[dict], deadline: float | None):
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        return await self.pool.client(agent.model).chat(messages, agent.sampling, timeout=timeout)

    # -- one layer --------------------------------------------------------------------------------

    async def _layer(self, plan: Plan, layer: int, prev: gateway_pb2.LayerReport | None, deadline: float | None,
                     usage: _Usage, report: gateway_pb2.LayerReport) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        t0 = time.monotonic()
        tasks: dict[asyncio.Task, int] = {}
        refs = list(prev.proposals) if prev is not None else None
        for i, agent in enumerate(plan.proposers):
            messages, fit = self._messages(plan, agent, refs)
            _set_reference_report(prev, fit)
            tasks[asyncio.create_task(self._propose(agent, messages, deadline))] = i
        need = plan.first_k or len(tasks)
        layer_end = None if plan.layer_deadline_s is None else t0 + plan.layer_deadline_s
        stop = "all"
        ok: list[gateway_pb2.Proposal] = []
        pending = set(tasks)
        try:
            while pending and len(ok) < need:
                ends = [e for e in (layer_end, deadline) if e is not None]
                wait = None if not ends else max(0.0, min(ends) - time.monotonic())
                done, pending = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if layer_end is not None and (deadline is None or layer_end <= deadline):
                        stop = "deadline"
                        break
                    raise DeadlineExceeded("the call's deadline passed while proposers were still answering")
                for task in sorted(done, key=tasks.__getitem__):
                    i = tasks[task]
                    agent = plan.proposers[i]
                    err = task.exception()
                    if err is not None:
                        usage.add(agent.model)
                        failure = _error_proto(err, agent.model)
                        report.failures.append(failure)
                        self._backend_metric(agent.model, time.monotonic() - t0, failure.cause)
                        yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=failure)
                        continue
                    res = task.result()
                    usage.add(agent.model, res.usage)
                    if not res.text.strip():   # nothing to aggregate: a failure, not a proposer that answered
                        failure = _empty_answer(agent.model, res, f"proposers[{i}]")
                        report.failures.append(failure)
                        self._backend_metric(agent.model, res.latency_s, failure.cause, res.usage)
                        yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=failure)
                        continue
                    self._backend_metric(agent.model, res.latency_s, None, res.usage)
                    prop = gateway_pb2.Proposal(
                        layer=layer, index=i, model=agent.model, text=res.text, usage=usage_proto(res.usage),
                        latency_s=res.latency_s, finish_reason=res.finish_reason or "", used=True)
                    ok.append(prop)
                    yield gateway_pb2.GenerateEvent(request_id=plan.request_id, proposal=prop)
            if pending and stop == "all":
                stop = "first_k"
        finally:
            late = [t for t in tasks if not t.done()]
            for t in late:
                t.cancel()
            if late:  # wait for their streams to close, so the backends see the disconnect now
                await asyncio.gather(*late, return_exceptions=True)
        report.cancelled = len(late)
        report.stop_reason = stop
        if stop == "deadline":
            for t in late:
                agent = plan.proposers[tasks[t]]
                usage.add(agent.model)
                failure = common_pb2.BackendError(
                    model=agent.model, cause="timeout",
                    message=f"no answer within the layer deadline of {plan.layer_deadline_s:g} s; request cancelled")
                report.failures.append(failure)
                self._backend_metric(agent.model, time.monotonic() - t0, "timeout")
                yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=failure)
        elif late:
            for t in late:
                usage.add(plan.proposers[tasks[t]].model)
        ok.sort(key=lambda p: p.index)
        report.proposals.extend(ok)
        report.latency_s = time.monotonic() - t0
        if self.metrics:
            self.metrics.stage(f"layer{layer}", report.latency_s)
        if len(ok) < plan.min_proposers:
            # layer 1 sends the client's conversation as it is: every proposer refusing its length is the client's to change
            refusal = layer == 1 and all(too_long(f.cause, f.http_status, f.message) for f in report.failures)
            raise outage(f"layer {layer}: only {len(ok)} of {len(plan.proposers)} proposers answered, below "
                         f"min_proposers={plan.min_proposers}; failed backends: {_describe(report.failures)}",
                         _left(deadline), "proposers were", refused=refusal)

    def _backend_metric(self, model: str, seconds: float, cause: str | None, usage=None) -> None:
        if self.metrics is None:
            return
        self.metrics.backend(model, seconds, cause)
        if usage is not None:
            self.metrics.tokens(model, usage.prompt_tokens, usage.completion_tokens)

    # -- the whole call ---------------------------------------------------------------------------

    async def run(self, plan: Plan, deadline: float | None = None, started: float | None = None,
                  deltas: bool = True) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        """Events of one MoA call; `deadline` is time.monotonic() seconds (the caller's gRPC deadline).
        deltas=False leaves out the aggregator's delta events (unary callers only want the result)."""
        t0 = time.monotonic()
        started = started or t0
        usage = _Usage()
        resp = gateway_pb2.GenerateResponse(request_id=plan.request_id, recipe=plan.recipe_name,
                                            aggregator_model=plan.aggregator.model, metadata=plan.metadata)
        resp.latency.queue_s = t0 - started
        prev = None
        for layer in range(1, plan.layers + 1):
            report = resp.layers.add(layer=layer)
            async for ev in self._layer(plan, layer, prev, deadline, usage, report):
                yield ev
            resp.latency.layer_s.append(report.latency_s)
            resp.failures.extend(report.failures)
            prev = report
        # aggregator: the last layer's answers as references, fitted to its window; its answer streamed
        # (a plan with no layers, the HTTP door's plain backend, sends the conversation as it is)
        agent = plan.aggregator
        messages, fit = self._messages(plan, agent, list(prev.proposals) if prev is not None else None)
        _set_reference_report(prev, fit)
        ta = time.monotonic()
        parts: list[str] = []
        finish, agg_usage, ttft = "", None, None
        timeout = None if deadline is None else max(0.001, deadline - ta)
        stream = self.pool.client(agent.model).stream_chat(messages, agent.sampling, timeout=timeout)
        try:
            async for chunk in stream:
                if chunk.text:
                    if ttft is None:
                        ttft = time.monotonic() - ta
                    parts.append(chunk.text)
                    if deltas:
                        yield gateway_pb2.GenerateEvent(request_id=plan.request_id,
                                                        delta=gateway_pb2.AggregatorDelta(text=chunk.text))
                if chunk.usage is not None:
                    agg_usage = chunk.usage
                if chunk.finish_reason:
                    finish = chunk.finish_reason
        except BackendError as err:
            usage.add(agent.model)
            self._backend_metric(agent.model, time.monotonic() - ta, err.cause)
            failure = backend_error_proto(err)
            resp.failures.append(failure)
            yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=failure)
            if plan.layers == 0 and err.refused:  # a plain backend (the HTTP door's pass-through) got the
                # client's conversation as it is; a recipe's aggregator gets our prompt, so its refusal is ours
                raise InvalidArgument(f"model {agent.model!r} refused the request (HTTP {err.http_status}): "
                                      f"{err.message}") from None
            if fit is not None and fit.budget == 0 and err.too_long:
                # by moaa's own count the conversation and max_tokens fill the aggregator's window, leaving
                # the references no room: what is over is the client's, and a retry would pay the proposers
                # to be refused again (with room left, the window or the count may be the config's: a retry)
                raise InvalidArgument(
                    f"aggregator {agent.model!r} refused the prompt for its length (HTTP {err.http_status}: "
                    f"{err.message}); the conversation and max_tokens leave its references no room: shorten "
                    "the conversation or lower max_tokens") from None
            raise outage(f"aggregator failed: {_describe([failure])}", _left(deadline), "the aggregator was") from None
        finally:
            await stream.aclose()
        usage.add(agent.model, agg_usage)
        agg_s = time.monotonic() - ta
        self._backend_metric(agent.model, agg_s, None, agg_usage)
        resp.text = "".join(parts)
        resp.finish_reason = finish
        resp.usage.extend(usage.to_proto())
        lat = resp.latency
        lat.aggregator_s = agg_s
        lat.aggregator_ttft_s = ttft or agg_s
        lat.total_s = time.monotonic() - started
        if self.metrics:
            self.metrics.stage("aggregator", agg_s)
            self.metrics.stage("aggregator_ttft", lat.aggregator_ttft_s)
            self.metrics.stage("total", lat.total_s)
        yield gateway_pb2.GenerateEvent(request_id=plan.request_id, final=resp)


def _set_reference_report(report: gateway_pb2.LayerReport | None, fit) -> None:
    """Record what a layer's references cost after fitting (the largest over the models they went to)."""
    if report is not None and fit is not None:
        report.reference_tokens = max(report.reference_tokens, fit.tokens)
        report.references_trimmed = report.references_trimmed or fit.trimmed
