"""The MoA engine: proposer layers fanned out concurrently, then the aggregator streamed back.

`MoAEngine.run(plan, deadline)` is an async generator of `GenerateEvent`s: each proposal or failure as
it completes, the aggregator's deltas as the backend streams them, and a final event with the whole
result. A layer ends when all proposers answered, after the first k answers (`first_k`) or at the
layer deadline, whichever comes first; requests still running are then cancelled, which closes their
HTTP streams and frees the backend's slot. Only the first k answers are used (answers that came with
the k-th are late too, their tokens counted); a late proposer whose backend had already failed is
reported with that failure, one cut at the deadline with the replica and attempts it got to. Closing
the generator (the caller cancelled) cancels everything in flight the same way.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator


from moaa.services.backend import BackendError
from moaa.services.backend.errors import too_long
from moaa.services.common.convert import backend_error_proto, empty_answer_proto, usage_proto
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


# turns of the event loop given, once a layer has its k answers, to answers already received (in the
# socket, or but for the [DONE]) so that they are read instead of cut: their tokens were spent. No waiting
_DRAIN_TURNS = 4


def _left(deadline: float | None) -> float | None:
    """Seconds left of the caller's deadline (a time.monotonic() value)."""
    return None if deadline is None else deadline - time.monotonic()


def _error_proto(err: BaseException, model: str) -> common_pb2.BackendError:
    if isinstance(err, BackendError):
        return backend_error_proto(err)
    return common_pb2.BackendError(model=model, cause="malformed", message=f"{type(err).__name__}: {err}")


def _empty_answer(model: str, res, role: str) -> common_pb2.BackendError:
    """An empty answer of a proposer (min_proposers counts answers) or of the aggregator: a failure."""
    request_field = "aggregator_sampling" if role == "aggregator" else "proposer_sampling"
    return empty_answer_proto(model, res.endpoint, res.attempts, res.finish_reason,
                              f"the recipe's {role}.sampling.max_tokens (or {request_field}.max_tokens)")


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

    async def _propose(self, agent: Agent, messages: list[dict], deadline: float | None, progress: dict):
        timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
        return await self.pool.client(agent.model).chat(messages, agent.sampling, timeout=timeout,
                                                        progress=progress)

    # -- one layer --------------------------------------------------------------------------------

    async def _layer(self, plan: Plan, layer: int, prev: gateway_pb2.LayerReport | None, deadline: float | None,
                     usage: _Usage, report: gateway_pb2.LayerReport) -> AsyncIterator[gateway_pb2.GenerateEvent]:
        t0 = time.monotonic()
        tasks: dict[asyncio.Task, int] = {}
        progress: dict[int, dict] = {}  # per proposer: endpoint, attempts, last error, usage (backend/client.py)
        finished: list[asyncio.Task] = []  # in completion order: "the first k" of several done at once
        refs = list(prev.proposals) if prev is not None else None
        fits = []
        for i, agent in enumerate(plan.proposers):
            messages, fit = self._messages(plan, agent, refs)
            fits.append(fit)
            progress[i] = {}
            task = asyncio.create_task(self._propose(agent, messages, deadline, progress[i]))
            task.add_done_callback(finished.append)
            tasks[task] = i
        _set_reference_report(prev, fits)
        need = plan.first_k or len(tasks)
        layer_end = None if plan.layer_deadline_s is None else t0 + plan.layer_deadline_s
        stop = "all"
        ok: list[gateway_pb2.Proposal] = []
        extra: list[asyncio.Task] = []  # done with or after the k-th answer, or at the deadline: late, not used
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
                # done callbacks may still be queued for a task that finished just now: it comes last
                for task in sorted(done, key=lambda t: (finished.index(t), 0) if t in finished
                                   else (len(finished), tasks[t])):
                    i = tasks[task]
                    agent = plan.proposers[i]
                    err = task.exception()
                    if err is None and len(ok) >= need:
                        extra.append(task)
                        continue
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
            if (pending or extra) and stop == "all":
                stop = "first_k"
                for _ in range(_DRAIN_TURNS):  # late answers already here are read, not cut (their usage counts)
                    await asyncio.sleep(0)
            extra += [t for t in pending if t.done()]  # done since the last wakeup: late too, not dropped
        finally:
            late = [t for t in tasks if not t.done()]
            for t in late:
                t.cancel()
            if late:  # wait for their streams to close, so the backends see the disconnect now
                await asyncio.gather(*late, return_exceptions=True)
        report.cancelled = len(late) + len(extra)
        report.stop_reason = stop
        for t in sorted(extra + late, key=tasks.__getitem__):
            i = tasks[t]
            failure = self._late(plan, plan.proposers[i].model, t, progress[i], stop, usage, time.monotonic() - t0)
            if failure is not None:
                report.failures.append(failure)
                yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=failure)
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

    def _late(self, plan: Plan, model: str, task: asyncio.Task, progress: dict, stop: str, usage: _Usage,
              seconds: float) -> common_pb2.BackendError | None:
        """Account for a proposer the layer stopped waiting for; its failure to report, if any. Tokens of an
        answer received whole are counted (they were spent) though the answer is not used; a backend that had
        already failed is reported as it failed (never swallowed); one cut at the layer deadline, as a timeout
        naming the replica it waited for and the attempts made."""
        res = None if task.cancelled() or task.exception() is not None else task.result()
        spent = res.usage if res is not None else progress.get("usage")
        usage.add(model, spent)
        if spent is not None and self.metrics is not None:
            self.metrics.tokens(model, spent.prompt_tokens, spent.completion_tokens)
        err = None if task.cancelled() else task.exception()
        if err is not None:  # it failed as it was cancelled: that failure, as it is
            failure = _error_proto(err, model)
        elif res is not None or (spent is not None and stop != "deadline"):
            return None  # answered, after the k-th: late, not used
        else:
            failure = self._cut(plan, model, progress, stop)
            if failure is None:
                return None  # still answering at the k-th: cancelled, nothing failed
        self._backend_metric(model, seconds, failure.cause)
        return failure

    @staticmethod
    def _cut(plan: Plan, model: str, progress: dict, stop: str) -> common_pb2.BackendError | None:
        """The failure of a proposer cancelled while still running: after a failed attempt (first_k or the
        deadline cut its retry), or with no answer by the layer deadline; None when it was merely late."""
        last: BackendError | None = progress.get("error")
        attempts = progress.get("attempts", 0)
        cut = ("the layer stopped at first_k" if stop != "deadline"
               else f"no answer within the layer deadline of {plan.layer_deadline_s:g} s")
        if stop != "deadline":
            if last is None:
                return None
            return common_pb2.BackendError(
                model=model, endpoint=last.endpoint, cause=last.cause, http_status=last.http_status,
                attempts=attempts, message=f"{last.message} ({cut} before a retry answered; request cancelled)")
        message = f"{cut}; request cancelled"
        if last is not None:
            status = f" HTTP {last.http_status}" if last.http_status else ""
            where = f" at {last.endpoint}" if last.endpoint else ""
            message += f" (earlier attempt failed{where}: {last.cause}{status}: {last.message})"
        return common_pb2.BackendError(model=model, endpoint=progress.get("endpoint", ""), cause="timeout",
                                       http_status=last.http_status if last is not None else 0,
                                       attempts=attempts, message=message)

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
        _set_reference_report(prev, [fit])
        ta = time.monotonic()
        parts: list[str] = []
        finish, agg_usage, ttft = "", None, None
        timeout = None if deadline is None else max(0.001, deadline - ta)
        client, stream = self.pool.client(agent.model), None
        try:
            if not deltas:   # a unary caller sees nothing before the end: a stream cut midway is retried
                res = await client.chat(messages, agent.sampling, timeout=timeout)
                parts, finish, agg_usage, ttft = [res.text], res.finish_reason or "", res.usage, res.ttft_s
            else:
                stream = client.stream_chat(messages, agent.sampling, timeout=timeout)
                async for chunk in stream:
                    if chunk.text:
                        if ttft is None:
                            ttft = time.monotonic() - ta
                        parts.append(chunk.text)
                        yield gateway_pb2.GenerateEvent(request_id=plan.request_id,
                                                        delta=gateway_pb2.AggregatorDelta(text=chunk.text))
                    if chunk.usage is not None:
                        agg_usage = chunk.usage
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
            if plan.layers and not "".join(parts).strip():
                # no answer to train on: a failure, as a proposer's empty answer is (a plain backend's empty
                # answer is the client's to judge, as OpenAI returns it)
                empty = _empty_answer(agent.model, stream if deltas else res, "aggregator")
                resp.failures.append(empty)
                yield gateway_pb2.GenerateEvent(request_id=plan.request_id, failure=empty)
                self._backend_metric(agent.model, time.monotonic() - ta, empty.cause, agg_usage)
                raise outage(f"aggregator failed: {_describe([empty])}", _left(deadline), "the aggregator was")
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
            if stream is not None:
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


def _set_reference_report(report: gateway_pb2.LayerReport | None, fits: list) -> None:
    """Record what a layer's references cost after fitting, for the models they went to. Where their windows
    differ, the smallest copy: the one the proposals' trimmed flags (the largest cut) describe."""
    fits = [f for f in fits if f is not None]
    if report is not None and fits:
        report.reference_tokens = min(f.tokens for f in fits)
        report.references_trimmed = any(f.trimmed for f in fits)
