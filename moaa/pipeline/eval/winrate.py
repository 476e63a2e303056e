"""Pairwise win rates: raw, length-controlled (AlpacaEval 2), and bootstrap confidence intervals.

Preferences are per instruction, the probability that the model beats the baseline, in [0, 1]: each
pair is judged in both orders and the two verdicts are averaged (win 1, tie 0.5, loss 0), so a judge
that only follows position gives 0.5, not a win.

Length-controlled win rate (Dubois et al. 2024, arXiv 2404.04475; alpaca_eval `glm_winrate.py`,
GLM "length_controlled_v1"). For instruction i with preference y_i in [0, 1]:

    d_i   = len(model_i) - len(baseline_i)                  (characters)
    x_i   = tanh(d_i / sd(d))                               (sd with ddof=1, as pandas' .std())
    P(model wins on i) = sigmoid(theta + beta * x_i + phi * difficulty_i)

fitted by maximum likelihood with soft labels (y_i weighs the "win" outcome, 1 - y_i the "loss"), no
separate intercept (theta is the model's term), then predicted with the length term set to zero:

    LC = 100 * mean_i sigmoid(theta + phi * difficulty_i)

AlpacaEval takes `difficulty_i` from a joint fit over its whole leaderboard and adds a
regularisation towards that leaderboard's baselines; neither exists for a user's own prompts, so here
difficulty is optional (per-instruction values the caller supplies, e.g. from an earlier run) and the
fit is plain or L2-penalised with strength 1/(2C) on all coefficients (C=None: unpenalised; the
default C=100 keeps a perfectly separable table finite and moves a typical table by well under 0.1
points). The sign convention of d is model minus baseline; AlpacaEval uses the opposite, which only
flips beta's sign and leaves LC unchanged. With no length differences at all, LC equals the raw win rate.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import optimize, special, stats

VERDICT_VALUE = {"A": 1.0, "B": 0.0, "tie": 0.5}


def win_rate(prefs: Sequence[float]) -> float:
    p = np.asarray(prefs, dtype=float)
    if p.size == 0:
        raise ValueError("no preferences")
    return float(p.mean() * 100.0)


@dataclass
class LCFit:
    lc_win_rate: float
    win_rate: float
    theta: float                 # the model's term
    beta: float                  # length term (on tanh of the normalised length difference)
    phi: float                   # instruction difficulty term (0 without difficulty)
    length_sd: float
    n: int

    def to_json(self) -> dict:
        return asdict(self)


def _design(prefs, len_model, len_baseline, difficulty):
    y = np.asarray(prefs, dtype=float)
    lm, lb = np.asarray(len_model, dtype=float), np.asarray(len_baseline, dtype=float)
    if not (y.shape == lm.shape == lb.shape and y.ndim == 1 and y.size > 0):
        raise ValueError("preferences and lengths must be equal-length non-empty sequences")
    d = lm - lb
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must lie in [0, 1]")
    sd = float(np.std(d, ddof=1)) if d.size > 1 else 0.0
    x_len = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    diff = np.zeros_like(d) if difficulty is None else np.asarray(difficulty, dtype=float)
    if diff.shape != d.shape:
        raise ValueError("difficulty must have one value per instruction")
    X = np.column_stack([np.ones_like(d), x_len, diff])
    return X, y, sd


def _fit(X: np.ndarray, y: np.ndarray, C: float | None) -> np.ndarray:
    """Soft-label logistic regression (no intercept beyond column 0), optional L2 penalty 1/(2C)."""
    active = np.array([True, bool(np.any(X[:, 1] != 0)), bool(np.any(X[:, 2] != 0))])
    Xa = X[:, active]
    lam = 0.0 if C is None else 1.0 / C

    def loss(w):
        z = Xa @ w
        # -[y log s(z) + (1-y) log(1 - s(z))] = logaddexp(0, z) - y z
        val = np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * lam * w @ w
        grad = Xa.T @ (special.expit(z) - y) + lam * w
        return val, grad

    res = optimize.minimize(loss, np.zeros(Xa.shape[1]), jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 10_000})
    w = np.zeros(3)
    w[active] = res.x
    return w


def length_controlled_win_rate(prefs: Sequence[float], len_model: Sequence[float], len_baseline: Sequence[float],
                               difficulty: Sequence[float] | None = None, C: float | None = 100.0) -> LCFit:
    X, y, sd = _design(prefs, len_model, len_baseline, difficulty)
    w = _fit(X, y, C)
    p0 = special.expit(w[0] + w[2] * X[:, 2])  # length term set to zero
    return LCFit(lc_win_rate=float(p0.mean() * 100.0), win_rate=win_rate(y), theta=float(w[0]),
                 beta=float(w[1]), phi=float(w[2]), length_sd=sd, n=int(y.size))


def prompt_rows(groups: Sequence) -> list[np.ndarray]:
    """The row indices of each prompt, in the order prompts first appear (`groups`: one label per row)."""
    labels = np.asarray(groups, dtype=object)
    return [np.flatnonzero(labels == g) for g in dict.fromkeys(groups)]


def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], float], *, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, groups: Sequence | None = None) -> tuple[float, float]:
    """Percentile bootstrap: `statistic(indices)` on resampled row indices.

    The resampled unit is the prompt: `groups` (one label per row, e.g. the prompt id of each of k sampled
    answers) draws whole groups, so k correlated rows of one prompt are never counted as k independent ones.
    Without `groups` every row is its own prompt."""
    if groups is None:
        units, rows_of = n, (lambda g: g)
    else:
        members = prompt_rows(groups)
        units, rows_of = len(members), (lambda g: np.concatenate([members[k] for k in g]))
    if units < 2:
        v = statistic(np.arange(n))
        return v, v
    res = stats.bootstrap((np.arange(units),), lambda g: statistic(rows_of(g.astype(int))), vectorized=False,
                          n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                          random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return float(lo), float(hi)


# The fewest prompts for which an interval can support a claim: below 6, even a unanimous result is not
# significant at 5% (two-sided sign test: 2 * 0.5**5 = 0.0625), while a percentile bootstrap of it is a point.
MIN_PROMPTS_FOR_CI = 6
SIGN_TEST_LEVEL = 0.05


def sign_test(prefs: Sequence[float], groups: Sequence | None = None) -> tuple[int, int, float]:
    """(prompts won, prompts lost, two-sided exact sign-test p) over prompts (a prompt's rows averaged when
    `groups` labels several per prompt); ties are left out, as the sign test does."""
    y = np.asarray(prefs, dtype=float)
    if groups is not None:
        y = np.asarray([y[rows].mean() for rows in prompt_rows(groups)])
    won, lost = int(np.sum(y > 0.5)), int(np.sum(y < 0.5))
    p = float(stats.binomtest(won, won + lost, 0.5).pvalue) if won + lost else 1.0
    return won, lost, p


def claim(ci: Sequence[float], n: int, *, even: float, sign_p: float | None = None) -> str:
    """The one rule for what an interval supports, each report wording it its own way: "too_few" (below
    MIN_PROMPTS_FOR_CI), "includes" (the interval includes `even`), "sign_test" (it excludes `even`, but the
    exact sign test over the decided units is not below 5%), else "better" or "worse". The sign test is there
    because at a few prompts the percentile bootstrap's interval is too narrow (measured: 8.7% false
    differences at 7 prompts for a judge with no preference, against the 5% a 95% interval promises; e.g. 6
    wins and 1 loss, p = 0.125)."""
    if n < MIN_PROMPTS_FOR_CI:
        return "too_few"
    lo, hi = ci
    side = "better" if lo > even else "worse" if hi < even else None
    if side is None:
        return "includes"
    if sign_p is not None and sign_p >= SIGN_TEST_LEVEL:
        return "sign_test"
    return side


def conclusion(ci: Sequence[float], n_prompts: int, *, even: float = 50.0, sign_p: float | None = None) -> str:
    """What a win rate's interval lets a report say (`claim`): a difference only when the whole interval lies
    on one side of `even` (50%) and the sign test agrees; otherwise "no measurable difference", never a win."""
    said = claim(ci, n_prompts, even=even, sign_p=sign_p)
    if said == "too_few":
        return f"too few prompts to tell ({n_prompts} < {MIN_PROMPTS_FOR_CI})"
    if said == "includes":
        return "no measurable difference"
    if said == "sign_test":
        return f"no measurable difference (the interval excludes {even:g} but the sign test gives p = {sign_p:.2g})"
    return said


@dataclass
class WinRateReport:
    model: str
    baseline: str
    n: int                       # judged rows (prompts, or samples for `:sampled` pairs)
    win_rate: float | None
    win_rate_ci: tuple[float, float] | None
    lc_win_rate: float | None
    lc_win_rate_ci: tuple[float, float] | None
    wins: float
    ties: float
    losses: float
    inconsistent: int            # pairs whose two orders disagreed (position-driven verdicts)
    avg_len_model: float | None
    avg_len_baseline: float | None
    beta_length: float | None
    prompts: int = 0             # distinct prompts among the n rows: the bootstrap's resampled unit
    conclusion: str = ""         # what the win rate's interval supports (see `conclusion`)
    lc_conclusion: str = ""      # the same for the length-controlled win rate
    abstained: int = 0           # pairs the judge gave no readable verdict on (left out of n, never ties)
    failed: int = 0              # judgments that failed (a backend error): retried on the next run
    missing: int = 0             # prompts without an answer from one side, so never judged
    one_order: int = 0           # of the n: pairs decided by one order, the judge unreadable in the other
    empty: int = 0               # of the n: pairs decided without the judge, an answer being empty (it loses;
                                 # both empty: a tie)
    same: int = 0                # of the n: pairs of the same answer on both sides, a tie without the judge
    fewer_judges: int = 0        # of the n: verdicts an ensemble gave without a judge whose backend failed
    sign_test_p: float | None = None   # two-sided exact sign test over the decided prompts (ties left out)

    def to_json(self) -> dict:
        return asdict(self)


def summarize(model: str, baseline: str, prefs: Sequence[float], len_model: Sequence[float],
              len_baseline: Sequence[float], *, difficulty: Sequence[float] | None = None,
              n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95,
              inconsistent: int = 0, prompt_ids: Sequence | None = None, abstained: int = 0, failed: int = 0,
              missing: int = 0, one_order: int = 0, empty: int = 0, same: int = 0,
              fewer_judges: int = 0) -> WinRateReport:
    """`prompt_ids`: the prompt of each row where several rows share one (k samples per prompt): the
    intervals resample prompts. With no judged row at all, every rate is None and the conclusion says why."""
    counts = {"abstained": abstained, "failed": failed, "missing": missing}
    y = np.asarray(prefs, dtype=float)
    if y.size == 0:
        return WinRateReport(model, baseline, 0, None, None, None, None, 0.0, 0.0, 0.0, 0, None, None, None,
                             conclusion=f"no verdict: none of the pairs was judged ({abstained} abstained, "
                                        f"{failed} failed, {missing} missing an answer)", **counts)
    lm, lb = np.asarray(len_model, float), np.asarray(len_baseline, float)
    diff = None if difficulty is None else np.asarray(difficulty, float)
    prompts = len(y) if prompt_ids is None else len(set(prompt_ids))
    _, _, sign_p = sign_test(y, prompt_ids)
    fit = length_controlled_win_rate(y, lm, lb, diff)
    wr_ci = bootstrap_ci(len(y), lambda i: y[i].mean() * 100.0, n_resamples=n_resamples, seed=seed,
                         confidence=confidence, groups=prompt_ids)
    lc_ci = bootstrap_ci(len(y), lambda i: length_controlled_win_rate(
        y[i], lm[i], lb[i], None if diff is None else diff[i]).lc_win_rate,
        n_resamples=n_resamples, seed=seed, confidence=confidence, groups=prompt_ids)
    return WinRateReport(
        model=model, baseline=baseline, n=int(y.size), win_rate=fit.win_rate, win_rate_ci=wr_ci,
        lc_win_rate=fit.lc_win_rate, lc_win_rate_ci=lc_ci, wins=float(np.sum(y > 0.5)),
        ties=float(np.sum(y == 0.5)), losses=float(np.sum(y < 0.5)),
        inconsistent=inconsistent,
        avg_len_model=float(lm.mean()), avg_len_baseline=float(lb.mean()), beta_length=fit.beta,
        prompts=prompts, conclusion=conclusion(wr_ci, prompts, sign_p=sign_p),
        lc_conclusion=conclusion(lc_ci, prompts, sign_p=sign_p), one_order=one_order, empty=empty,
        same=same, fewer_judges=fewer_judges, sign_test_p=sign_p, **counts)


def _rate(value: float | None, ci) -> str:
    return "-" if value is None else f"{value:.1f}% [{ci[0]:.1f}, {ci[1]:.1f}]"


def format_winrate(w: dict) -> str:
    """One line per model/baseline pair for the printed summaries (`moaa eval`, `moaa pipeline run`)."""
    lc = "" if w.get("lc_conclusion") in (None, "", w.get("conclusion")) else f"; length-controlled: {w['lc_conclusion']}"
    extra = "".join(f", {w[k]} {label}" for k, label in (("abstained", "abstained"), ("failed", "failed"),
                    ("missing", "missing"), ("one_order", "decided by one order"),
                    ("empty", "decided by an empty answer, not judged"),
                    ("same", "the same answer on both sides (a tie, not judged)"),
                    ("fewer_judges", "decided without a judge whose backend failed")) if w.get(k))
    return (f"{w['model']} vs {w['baseline']}: {w.get('conclusion') or '-'}{lc} (win rate "
            f"{_rate(w['win_rate'], w['win_rate_ci'])}, length-controlled {_rate(w['lc_win_rate'], w['lc_win_rate_ci'])}, "
            f"n={w['n']}, order-inconsistent {w.get('inconsistent', 0)}{extra})")
