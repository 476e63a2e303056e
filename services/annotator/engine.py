"""Annotating one prompt: all judges at once, criteria filtering, the aggregator judge, the decision.

All judge calls of a prompt are in flight together (bounded only by the shared BackendPool's
per-backend limits), so a batch of prompts keeps every judge backend busy.

A judge whose backend failed is left out of the decision (never counted as an abstention); when fewer
judges answered than the ensemble's quorum (`min_judges`, default all), or the aggregator judge of
mode 'moa' failed, the prompt raises UNAVAILABLE naming the judges and causes, so callers retry it.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from moaa.services.backend.errors import BackendError
from moaa.services.common.errors import outage
from moaa.services.common.logs import new_request_id
from moaa.services.common.convert import backend_error_proto
from moaa.services.config import EnsembleConfig, JudgeConfig, MoaaConfig
from moaa.v1 import annotator_pb2, common_pb2

from . import combine as cb
from . import stats
from .judging import CallLog, Candidate, Reply, pairwise, pointwise_all, pointwise_single
from .templates import JudgeTemplate, TemplateError, TemplateStore

MODES = ("pointwise", "pairwise", "moa")


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


@dataclass
class Job:
    """One validated annotation request."""

    prompt: list[dict]
    candidates: list[Candidate]
    ensemble_name: str
    ensemble: EnsembleConfig
    judges: list[JudgeConfig]
    mode: str
    seed: int
    id: str = ""
    request_id: str = ""
    reference: Candidate | None = None
    notes: list[str] = field(default_factory=list)


class AnnotationEngine:
    def __init__(self, config: MoaaConfig, pool, metrics=None):
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self._stores: dict[str | None, TemplateStore] = {}
        self.check_templates()

    def store(self, ens: EnsembleConfig) -> TemplateStore:
        if ens.templates_dir not in self._stores:
            self._stores[ens.templates_dir] = TemplateStore([ens.templates_dir] if ens.templates_dir else None)
        return self._stores[ens.templates_dir]

    def check_templates(self) -> None:
        """Fail at start, not at the first request, when a configured template is missing, broken, or of a
        kind its setting cannot use (a pairwise template as pointwise_template would judge another mode)."""
        for name, ens in self.config.ensembles.items():
            try:
                store = self.store(ens)
                for t in [j.template for j in ens.judges] + ([ens.aggregator.template] if ens.aggregator else []):
                    store.get(t)
                for key, kind in (("pointwise_template", "pointwise"), ("pairwise_template", "pairwise"),
                                  ("aggregator_template", "aggregator")):
                    tpl = store.get(getattr(ens, key))
                    if tpl.kind != kind:
                        raise TemplateError(f"{key} {tpl.name!r} is a {tpl.kind} template: name a {kind} one")
            except TemplateError as err:
                raise TemplateError(f"ensembles.{name}: {err}") from None

    def outage(self) -> str | None:
        """Why no ensemble can be decided now (every one lacks its quorum of reachable judges, or its
        aggregator judge in mode 'moa'), or None. Drives the health status of the Annotator service."""
        why = []
        for name, ens in self.config.ensembles.items():
            down = [j.name for j in ens.judges if not self.pool.reachable(j.model)]
            need = cb.quorum(ens.min_judges, len(ens.judges))
            if len(ens.judges) - len(down) < need:
                why.append(f"{name}: judges {', '.join(down)} unreachable, {need} needed")
            elif ens.mode == "moa" and ens.aggregator is not None and not self.pool.reachable(ens.aggregator.model):
                why.append(f"{name}: aggregator judge {ens.aggregator.name} unreachable")
            else:
                return None
        return "; ".join(why)

    def judge_template(self, ens: EnsembleConfig, judge: JudgeConfig, mode: str) -> JudgeTemplate:
        store = self.store(ens)
        own = store.get(judge.template)
        if mode == "pairwise":
            return own if own.kind == "pairwise" else store.get(ens.pairwise_template)
        if mode == "pointwise" or own.kind == "aggregator":
            return own if own.kind == "pointwise" else store.get(ens.pointwise_template)
        return own

    def _chat(self, judge: JudgeConfig, log: CallLog, deadline: float | None):
        client = self.pool.client(judge.model)
        loop = asyncio.get_running_loop()

        async def chat(messages: list[dict]) -> Reply:
            timeout = None if deadline is None else max(0.001, deadline - loop.time())
            t0 = time.perf_counter()
            try:
                res = await client.chat(messages, judge.sampling, n=1, timeout=timeout)
            except BackendError as err:
                if self.metrics is not None:  # moaa_backend_errors{service="annotator",model,cause}
                    self.metrics.backend(judge.model, time.perf_counter() - t0, cause=err.cause)
                raise
            u = res.usage
            for k in log.usage:
                log.usage[k] += int(getattr(u, k, 0) or 0)
            if self.metrics is not None:   # moaa_tokens_total, as the gateway counts its backends' tokens
                self.metrics.tokens(judge.model, u.prompt_tokens, u.completion_tokens)
            cut = ""
            if res.finish_reason == "length":
                fix = (f"raise the judge's max_tokens (judges[{judge.name}].sampling.max_tokens="
                       f"{judge.sampling.max_tokens})")
                if not res.text.strip():
                    # all of max_tokens went on reasoning: no opinion was given, so a failure (retried), not an abstention
                    err = BackendError(judge.model, res.endpoint, "max_tokens",
                                       f"answer cut at max_tokens={judge.sampling.max_tokens} before any verdict: "
                                       f"{fix}", attempts=res.attempts)
                    if self.metrics is not None:
                        self.metrics.backend(judge.model, time.perf_counter() - t0, cause=err.cause)
                    raise err
                cut = f"the reply was cut at max_tokens: {fix}"   # said if it cannot be read (an abstention)
            if self.metrics is not None:
                self.metrics.backend(judge.model, time.perf_counter() - t0)
            return Reply(res.text, cut)

        return chat

    async def _run_judge(self, job: Job, judge: JudgeConfig, mode: str, deadline, log: CallLog) -> cb.JudgeResult:
        ens = job.ensemble
        tpl = self.judge_template(ens, judge, mode)
        seed = stats.judge_seed(job.seed, judge.name)
        chat = self._chat(judge, log, deadline)
        args = (judge, tpl, chat, job.prompt, job.candidates, seed, ens.scale_min, ens.scale_max, log)
        if tpl.kind == "pairwise":
            return await pairwise(*args, reference=job.reference)
        if tpl.scope == "single":
            return await pointwise_single(*args)
        return await pointwise_all(*args)

    async def annotate(self, job: Job, timeout: float | None = None) -> annotator_pb2.AnnotateResponse:
        ens = job.ensemble
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        t0 = time.perf_counter()
        logs = {j.name: CallLog() for j in job.judges}
        judges = list(await asyncio.gather(*(self._run_judge(job, j, job.mode, deadline, logs[j.name]) for j in job.judges)))
        self._stage("judges", t0)
        rule, notes = ens.combine, list(job.notes)
        failed = {j.name: logs[j.name].failures for j in judges if logs[j.name].failures}
        if failed:
            judges = [j for j in judges if j.name not in failed]
            need = cb.quorum(ens.min_judges, len(job.judges))
            if len(judges) < need:
                raise outage(cb.outage_message(job.ensemble_name, failed, len(judges), len(job.judges), need),
                             _left(deadline), "judges were", refused=cb.all_refused(failed))
            notes.append(f"decided by {len(judges)} of {len(job.judges)} judges; failed: {cb.describe_failures(failed)}")
        lengths = [len(c.text) for c in job.candidates]
        criteria = cb.filter_criteria(judges, lengths, cb.FilterSettings(
            ens.criteria_filter, ens.max_criterion_disagreement, ens.max_criterion_length_corr,
            ens.criteria_length_min_candidates))
        kept = {c.name for c in criteria if c.kept}
        effective = {j.name: cb.effective_scores(j, kept) for j in judges}
        judges = [cb.with_scores(j, effective[j.name]) for j in judges]   # the scores that count; `overall` kept
        overall_tau, per_judge_tau = stats.agreement(effective)
        for j in judges:
            j.agreement = per_judge_tau.get(j.name)
            j.length_correlation = stats.spearman(effective[j.name], [float(x) for x in lengths])

        aggregator_result = None
        if rule == "aggregator":
            if job.mode != "moa" or ens.aggregator is None:
                why = "no aggregator judge is configured" if ens.aggregator is None else f"mode is {job.mode!r}"
                rule = "weighted"
                notes.append(f"combine 'aggregator' not possible ({why}): weighted mean used")
            else:
                t1 = time.perf_counter()
                agg_log = CallLog()
                logs[ens.aggregator.name] = agg_log
                aggregator_result = await self._aggregate(job, judges, effective, kept, deadline, agg_log)
                self._stage("aggregator", t1)
                if agg_log.failures:  # the aggregator judge is the decision in mode 'moa': no quorum without it
                    raise outage(f"aggregator judge backend failed: "
                                 f"{cb.describe_failures({ens.aggregator.name: agg_log.failures})}; mode 'moa' of "
                                 f"ensemble {job.ensemble_name!r} needs it; retry when the backend is back",
                                 _left(deadline), "the aggregator judge was")
                # the aggregator's own statistics, on the same definitions as a judge's
                aggregator_result.length_correlation = stats.spearman(aggregator_result.scores,
                                                                      [float(x) for x in lengths])
                aggregator_result.agreement = stats.mean_tau_with(aggregator_result.scores, effective)
                unread = [c.id for c, s in zip(job.candidates, aggregator_result.scores) if s is None]
                if unread:   # its decision would silently leave those answers out
                    rule = "weighted"
                    what = "" if aggregator_result.abstained else f" for answer(s) {', '.join(map(repr, unread))}"
                    notes.append(f"the aggregator judge gave no readable score{what}: weighted mean used")
        if job.mode == "moa" and ens.combine != "aggregator":
            # mode 'moa' means an aggregator judge decides; say plainly when the config has none decide
            why = "has no aggregator judge" if ens.aggregator is None else f"combines with {ens.combine!r}"
            notes.append(f"mode 'moa' but no aggregator judge decided (ensemble {job.ensemble_name!r} {why}): "
                         f"{rule} of the judges' scores used")
        if rule == "aggregator":
            combined = list(aggregator_result.scores)
        else:
            combined = cb.combine(effective, {j.name: j.weight for j in job.judges}, rule)
        decision = cb.decide([c.id for c in job.candidates], combined, overall_tau, cb.unread_counts(judges), len(judges),
                             cb.SkipRules(ens.min_margin, ens.min_agreement, ens.max_abstain_fraction))
        all_results = judges + ([aggregator_result] if aggregator_result is not None else [])
        return self._response(job, all_results, logs, criteria, combined, decision, overall_tau, rule, notes)

    async def _aggregate(self, job: Job, judges, effective, kept, deadline, log: CallLog) -> cb.JudgeResult:
        ens = job.ensemble
        agg = ens.aggregator
        store = self.store(ens)
        own = store.get(agg.template)
        tpl = own if own.kind == "aggregator" else store.get(ens.aggregator_template)
        seed = stats.judge_seed(job.seed, agg.name)

        def ratings(order: list[int]) -> dict:
            blocks = []
            for k, j in enumerate(judges, 1):
                lines = [f"Judge {k}:"]
                for p, i in enumerate(order, 1):
                    s = effective[j.name][i]
                    if s is None:
                        lines.append(f"  Answer {p}: no rating")
                        continue
                    crit = ", ".join(f"{c} {v:g}" for c, v in j.criteria[i].items() if c in kept)
                    reason = " ".join(j.rationales[i].split())[:200]
                    lines.append(f"  Answer {p}: {s:.1f}" + (f" ({crit})" if crit else "") + (f" - {reason}" if reason else ""))
                blocks.append("\n".join(lines))
            return {"ratings": "\n".join(blocks)}

        return await pointwise_all(agg, tpl, self._chat(agg, log, deadline), job.prompt, job.candidates, seed,
                                   ens.scale_min, ens.scale_max, log, extra=ratings)

    def _stage(self, name: str, t0: float) -> None:
        if self.metrics is not None:
            self.metrics.stage(f"annotate_{name}", time.perf_counter() - t0)

    def _response(self, job, results, logs, criteria, combined, decision, tau, rule, notes):
        nan = float("nan")
        resp = annotator_pb2.AnnotateResponse(
            request_id=job.request_id or new_request_id(), id=job.id, mode=job.mode, ensemble=job.ensemble_name,
            seed=job.seed, agreement=nan if tau is None else tau, skipped=decision.skipped,
            skip_reason=decision.skip_reason, margin=decision.margin, combine=rule, note="; ".join(notes))
        ids = [c.id for c in job.candidates]
        for r in results:
            log = logs[r.name]
            rep = resp.judges.add(
                judge=r.name, model=r.model, permutation_seed=r.seed, order=r.order,
                position_bias=_num(r.position_bias), length_correlation=_num(r.length_correlation),
                agreement=_num(r.agreement), abstentions=sum(s is None for s in r.scores), template=r.template,
                template_hash=r.template_hash, criteria=r.criteria_names, order_flip_rate=_num(r.order_flip_rate),
                requests=log.requests, usage=common_pb2.Usage(**log.usage))
            for i, cid in enumerate(ids):
                s = r.scores[i]
                o = r.overall[i] if r.overall else s
                rep.scores.add(candidate_id=cid, score=nan if s is None else s, overall=nan if o is None else o,
                               rationale=r.rationales[i], abstained=s is None,
                               abstain_reason=r.abstain_reasons[i] if s is None else "",
                               criteria=r.criteria[i], position=r.positions[i])
        # usage and failures of every judge asked, also of one that failed and is not in `results`
        models = {j.name: j.model for j in job.judges}
        if job.ensemble.aggregator is not None:
            models[job.ensemble.aggregator.name] = job.ensemble.aggregator.model
        usage_by_model: dict[str, list] = {}
        for name, log in logs.items():
            entry = usage_by_model.setdefault(models[name], [0, 0, 0, 0])
            for k, key in enumerate(("prompt_tokens", "completion_tokens", "total_tokens")):
                entry[k] += log.usage[key]
            entry[3] += log.requests
            resp.failures.extend(backend_error_proto(f) for f in log.failures)
        for model, (p, c, t, n) in usage_by_model.items():
            resp.usage.add(model=model, usage=common_pb2.Usage(prompt_tokens=p, completion_tokens=c, total_tokens=t),
                           requests=n)
        for i, cid in enumerate(ids):
            s = combined[i]
            resp.combined.add(candidate_id=cid, score=nan if s is None else s, rank=decision.ranks[i])
        if decision.chosen is not None:
            resp.chosen_id, resp.rejected_id = ids[decision.chosen], ids[decision.rejected]
        for c in criteria:
            resp.criteria.add(name=c.name, kept=c.kept, reason=c.reason, disagreement=_num(c.disagreement),
                              length_correlation=_num(c.length_correlation))
        return resp


def _num(x: float | None) -> float:
    return float("nan") if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
