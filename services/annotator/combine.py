"""From judges' ratings to one decision: criteria filtering, combining, chosen/rejected, skip reasons.

Pure functions. Scores are lists indexed by candidate (input order); None = no readable score.

Dynamic criteria filtering (moaa's reading of the MoAA model cards, see PAPER.md): each judge writes
the criteria it rates by. A criterion is dropped when the judges disagree on it strongly, i.e. its
ratings spread across the judges that used it by more than `max_criterion_disagreement` on average,
or, when only one judge used it, they stray that far from the other judges' overall scores; or when
it merely tracks answer length (Spearman >= `max_criterion_length_corr`, measured only with at least
`criteria_length_min_candidates` answers, since with 3 answers a perfect rank correlation is common).
A judge's score is then the mean of its kept criteria, or its overall score when it kept none.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from . import stats


@dataclass
class JudgeResult:
    """One judge's work on one prompt, candidates in input order."""

    name: str
    model: str
    weight: float = 1.0
    scores: list[float | None] = field(default_factory=list)
    overall: list[float | None] = field(default_factory=list)        # its overall rating as written, once filtered
    criteria: list[dict[str, float]] = field(default_factory=list)   # per candidate: criterion key -> rating
    criteria_names: list[str] = field(default_factory=list)
    rationales: list[str] = field(default_factory=list)
    abstain_reasons: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)               # 0-based position shown, per candidate
    order: list[int] = field(default_factory=list)                   # candidate indices in shown order
    seed: int = 0
    position_bias: float | None = None
    order_flip_rate: float | None = None
    length_correlation: float | None = None
    agreement: float | None = None
    template: str = ""
    template_hash: str = ""
    usage: dict[str, int] = field(default_factory=dict)
    requests: int = 0

    @property
    def abstained(self) -> bool:
        return all(s is None for s in self.scores)


@dataclass
class CriterionInfo:
    name: str
    kept: bool
    reason: str = ""
    disagreement: float | None = None
    length_correlation: float | None = None


@dataclass
class FilterSettings:
    enabled: bool = True
    max_disagreement: float = 3.0
    max_length_corr: float = 0.9
    length_min_candidates: int = 5


def filter_criteria(judges: list[JudgeResult], lengths: list[int], cfg: FilterSettings) -> list[CriterionInfo]:
    n = len(lengths)
    keys: list[str] = []
    for j in judges:
        for per_cand in j.criteria:
            keys += [k for k in per_cand if k not in keys]
    out = []
    for key in keys:
        raters = [j for j in judges if any(key in c for c in j.criteria)]
        spreads = []
        for i in range(n):
            vals = [j.criteria[i][key] for j in raters if i < len(j.criteria) and key in j.criteria[i]]
            if len(raters) >= 2:
                if len(vals) >= 2:
                    spreads.append(max(vals) - min(vals))
            elif vals:
                others = [j.scores[i] for j in judges if j not in raters and j.scores[i] is not None]
                if others:
                    spreads.append(abs(vals[0] - sum(others) / len(others)))
        disagreement = sum(spreads) / len(spreads) if spreads else None
        means = []
        for i in range(n):
            vals = [j.criteria[i][key] for j in raters if i < len(j.criteria) and key in j.criteria[i]]
            means.append(sum(vals) / len(vals) if vals else None)
        length_corr = stats.spearman(means, [float(x) for x in lengths]) if n >= cfg.length_min_candidates else None
        info = CriterionInfo(key, True, "", disagreement, length_corr)
        if cfg.enabled and disagreement is not None and disagreement > cfg.max_disagreement:
            info.kept, info.reason = False, f"judges disagree: mean spread {disagreement:.2f} > {cfg.max_disagreement:g}"
        elif cfg.enabled and length_corr is not None and length_corr >= cfg.max_length_corr:
            info.kept, info.reason = False, f"tracks answer length: Spearman {length_corr:.2f} >= {cfg.max_length_corr:g}"
        out.append(info)
    return out


def effective_scores(judge: JudgeResult, kept: set[str]) -> list[float | None]:
    """The judge's score per candidate after filtering: mean of kept criteria, else its overall score."""
    out = []
    for i, overall in enumerate(judge.scores):
        if overall is None:
            out.append(None)
            continue
        crit = judge.criteria[i] if i < len(judge.criteria) else {}
        vals = [v for k, v in crit.items() if k in kept]
        out.append(sum(vals) / len(vals) if vals else overall)
    return out


def with_scores(judge: JudgeResult, scores: list[float | None]) -> JudgeResult:
    """The judge with the filtered scores as its scores, so that every statistic and the returned `score` are
    the numbers that were combined; its overall ratings move to `overall`, and its pointwise position bias is
    measured again on the new scores."""
    out = replace(judge, overall=judge.scores, scores=list(scores))
    if out.overall != out.scores and out.position_bias is not None:
        out.position_bias = stats.position_bias_pointwise([out.scores[i] for i in out.order])
    return out


def combine(scores: dict[str, list[float | None]], weights: dict[str, float], rule: str) -> list[float | None]:
    """Per-candidate score over judges: 'mean' or 'weighted' mean of the judges that scored it."""
    n = len(next(iter(scores.values()))) if scores else 0
    out: list[float | None] = []
    for i in range(n):
        num = den = 0.0
        for name, s in scores.items():
            if s[i] is None:
                continue
            w = weights.get(name, 1.0) if rule == "weighted" else 1.0
            num += w * s[i]
            den += w
        out.append(num / den if den else None)
    return out


def quorum(min_judges: int | None, asked: int) -> int:
    """Judges that must answer: `min_judges` (capped at the judges asked), default all of them."""
    return asked if min_judges is None else min(min_judges, asked)


def describe_failures(failures: dict[str, list]) -> str:
    """'b (connect at http://...: refused), c (http_5xx ...)': each failed judge with its first failure."""
    parts = []
    for name, errs in failures.items():
        e = errs[0]
        where = f" at {e.endpoint}" if e.endpoint else ""
        status = f" HTTP {e.http_status}" if e.http_status else ""
        parts.append(f"{name} ({e.model}: {e.cause}{status}{where}: {e.message})")
    return ", ".join(parts)


def all_refused(failures: dict[str, list]) -> bool:
    """Every failed judge's backend refused the judging prompt's length (candidates past its context): no retry helps."""
    return all(e.too_long for errs in failures.values() for e in errs)


def outage_message(ensemble: str, failures: dict[str, list], answered: int, asked: int, need: int) -> str:
    """Why a prompt could not be decided because judge backends failed (an UNAVAILABLE item, retried; an
    INVALID_ARGUMENT one where every failure was a refusal)."""
    retry = "" if all_refused(failures) else "; retry when the backends are back"
    return (f"judge backends failed: {describe_failures(failures)}; {answered} of {asked} judges answered, "
            f"ensemble {ensemble!r} needs {need} (min_judges){retry}")


@dataclass
class Decision:
    chosen: int | None = None
    rejected: int | None = None
    margin: float = 0.0
    ranks: list[int] = field(default_factory=list)   # 1 = best, 0 = unscored
    skipped: bool = False
    skip_reason: str = ""


@dataclass
class SkipRules:
    min_margin: float = 0.5
    min_agreement: float = -1.0
    max_abstain_fraction: float = 0.5


# Scores are means of thirds and quarters: a margin equal to min_margin must not be skipped by rounding.
EPS = 1e-9


def unread_counts(judges: list[JudgeResult]) -> list[int]:
    """Per candidate, the judges that gave no readable score for it (after their one retry)."""
    n = len(judges[0].scores) if judges else 0
    return [sum(j.scores[i] is None for j in judges) for i in range(n)]


def decide(ids: list[str], combined: list[float | None], agreement: float | None,
           unread: list[int], judges_total: int, rules: SkipRules) -> Decision:
    """chosen = highest, rejected = lowest; ties broken by candidate id so input order never matters.
    `unread[i]`: the judges that gave no readable score for candidate i.

    Skips are for quality only; each reason starts with its kind (too_many_abstentions, too_few_scored,
    low_agreement, low_margin) and a colon, so reports count them by kind. A candidate more judges than
    max_abstain_fraction could not score is such a skip (it might be the best answer: a pair made from the
    others would be a guess). Failed judge backends never reach this function: the engine leaves them out
    or fails the item UNAVAILABLE."""
    scored = [i for i, s in enumerate(combined) if s is not None]
    ranked = sorted(scored, key=lambda i: (-combined[i], ids[i]))
    ranks = [0] * len(combined)
    for i in scored:   # 1 = best; equal scores share a rank (1, 1, 3)
        ranks[i] = 1 + sum(combined[k] > combined[i] + EPS for k in scored)
    d = Decision(ranks=ranks)
    most = max(range(len(unread)), key=lambda i: unread[i]) if unread else None
    if judges_total and most is not None and unread[most] / judges_total > rules.max_abstain_fraction:
        which = "" if len(set(unread)) == 1 else f" for answer {ids[most]!r}"
        d.skipped, d.skip_reason = True, (
            f"too_many_abstentions: {unread[most]} of {judges_total} judges gave no readable score{which} "
            f"(max_abstain_fraction {rules.max_abstain_fraction:g})")
        return d
    if len(ranked) < 2:
        d.skipped, d.skip_reason = True, f"too_few_scored: only {len(ranked)} candidate(s) received a score"
        return d
    best, worst = ranked[0], min(scored, key=lambda i: (combined[i], _neg(ids[i])))
    d.margin = combined[best] - combined[worst]
    if agreement is not None and agreement < rules.min_agreement - EPS:
        d.skipped, d.skip_reason = True, f"low_agreement: judges disagree, mean Kendall tau {agreement:.2f} below min_agreement {rules.min_agreement:g}"
    elif d.margin <= EPS:
        d.skipped, d.skip_reason = True, "low_margin: all candidates scored the same (margin 0)"
    elif d.margin < rules.min_margin - EPS:
        d.skipped, d.skip_reason = True, f"low_margin: margin {d.margin:.2f} below min_margin {rules.min_margin:g}"
    if not d.skipped:
        d.chosen, d.rejected = best, worst
    return d


def _neg(s: str) -> tuple:
    # reverse lexical order for the rejected side's tie-break, so chosen and rejected differ on ties
    return tuple(-ord(c) for c in s)
