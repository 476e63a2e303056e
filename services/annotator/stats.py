"""Bias control and agreement statistics: seeded permutations, position bias, Kendall tau, Spearman.

Pure functions over plain lists. A statistic that is undefined (fewer than two common items, constant
inputs) is None, never a made-up 0. Kendall's tau-b and Spearman's rho are computed here, over the few
candidates of one prompt: scipy's versions cost about 0.3 ms a call in argument checks, which was a third
of the annotator's CPU (py-spy, benchmarks/annotator.py); the tests check these against scipy.
"""
from __future__ import annotations

import hashlib
import math
import random
from itertools import combinations


def judge_seed(seed: int, judge: str) -> int:
    """A per-judge permutation seed derived from the request seed: stable across runs and processes."""
    digest = hashlib.sha256(f"{seed}:{judge}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def permutation(n: int, seed: int) -> list[int]:
    """Candidate indices in the order a judge is shown them."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _common(a: list[float | None], b: list[float | None]) -> tuple[list[float], list[float]]:
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def kendall_tau(a: list[float | None], b: list[float | None]) -> float | None:
    """Kendall's tau-b over the items both sides scored (scipy.stats.kendalltau's default variant)."""
    x, y = _common(a, b)
    if len(x) < 2 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    concordant = discordant = tied_x = tied_y = 0
    for i, j in combinations(range(len(x)), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        tied_x += dx == 0
        tied_y += dy == 0
        if dx and dy:
            if (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    n0 = len(x) * (len(x) - 1) // 2
    return _clean(max(-1.0, min(1.0, (concordant - discordant) / math.sqrt((n0 - tied_x) * (n0 - tied_y)))))


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, tied values sharing their average rank."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float | None], b: list[float | None]) -> float | None:
    """Spearman's rho over the items both sides scored: Pearson's r of their ranks."""
    x, y = _common(a, b)
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((u - mx) * (v - my) for u, v in zip(rx, ry))
    sxx = sum((u - mx) ** 2 for u in rx)
    syy = sum((v - my) ** 2 for v in ry)
    return _clean(max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy))))


def agreement(scores: dict[str, list[float | None]]) -> tuple[float | None, dict[str, float | None]]:
    """Mean pairwise Kendall tau over all judges, and each judge's mean tau with the others."""
    taus: dict[tuple[str, str], float] = {}
    for j, k in combinations(sorted(scores), 2):
        tau = kendall_tau(scores[j], scores[k])
        if tau is not None:
            taus[(j, k)] = tau
    overall = sum(taus.values()) / len(taus) if taus else None
    per_judge = {}
    for j in scores:
        mine = [t for pair, t in taus.items() if j in pair]
        per_judge[j] = sum(mine) / len(mine) if mine else None
    return overall, per_judge


def mean_tau_with(mine: list[float | None], others: dict[str, list[float | None]]) -> float | None:
    """Mean Kendall tau of one score list with each of others' (the aggregator judge's agreement)."""
    taus = [t for t in (kendall_tau(mine, s) for s in others.values()) if t is not None]
    return sum(taus) / len(taus) if taus else None


def position_bias_pointwise(scores_by_position: list[float | None]) -> float | None:
    """Share of decisive pairs (different scores) in which the earlier-shown answer scored higher; 0.5 = none."""
    earlier_wins = decisive = 0
    for i, j in combinations(range(len(scores_by_position)), 2):
        a, b = scores_by_position[i], scores_by_position[j]
        if a is None or b is None or a == b:
            continue
        decisive += 1
        earlier_wins += a > b
    return earlier_wins / decisive if decisive else None


def position_bias_pairwise(verdicts: list[str | None]) -> float | None:
    """Share of decisive verdicts (A or B) that chose the first-shown answer; 0.5 = none, 1 = always first."""
    decisive = [v for v in verdicts if v in ("A", "B")]
    return sum(v == "A" for v in decisive) / len(decisive) if decisive else None


def order_flip_rate(pairs: list[tuple[str | None, str | None]]) -> float | None:
    """Share of pairs (verdict in order xy, verdict in order yx) whose winner changed with the order."""
    judged = [(a, b) for a, b in pairs if a in ("A", "B", "tie") and b in ("A", "B", "tie")]
    if not judged:
        return None
    flips = 0
    for a, b in judged:
        winner_xy = {"A": "x", "B": "y"}.get(a, "tie")
        winner_yx = {"A": "y", "B": "x"}.get(b, "tie")
        flips += winner_xy != winner_yx
    return flips / len(judged)

