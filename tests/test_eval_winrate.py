"""Win rates: the length-controlled win rate against hand-computed values, bootstrap sanity, parsing."""
import math

import numpy as np
import pytest

from moaa.pipeline.eval.grading import grading_summary, parse_rating, pairwise_messages
from moaa.services.annotator.parsing import parse_verdict
from moaa.pipeline.eval.winrate import (MIN_PROMPTS_FOR_CI, bootstrap_ci, conclusion, format_winrate,
                                         length_controlled_win_rate, summarize, win_rate)


def _two_group_table():
    # 10 instructions where the model's answer is 300 chars longer (8 wins, 2 losses),
    # 5 where it is 300 chars shorter (2 wins, 3 losses).
    prefs = [1.0] * 8 + [0.0] * 2 + [1.0] * 2 + [0.0] * 3
    base = [500.0] * 15
    model = [800.0] * 10 + [200.0] * 5
    return prefs, model, base


def test_lc_two_groups_matches_closed_form():
    # Two length groups make the GLM saturated: theta + beta*x = logit(m1), theta - beta*x = logit(m2),
    # so theta = (logit m1 + logit m2)/2 and LC = 100 / (1 + sqrt((1-m1)/m1 * (1-m2)/m2)),
    # whatever the normalised length x is. Here m1 = 0.8, m2 = 0.4.
    prefs, model, base = _two_group_table()
    expected = 100.0 / (1.0 + math.sqrt((0.2 / 0.8) * (0.6 / 0.4)))  # = 62.0204...
    fit = length_controlled_win_rate(prefs, model, base, C=None)
    assert fit.lc_win_rate == pytest.approx(expected, abs=1e-4)
    assert fit.win_rate == pytest.approx(100 * 10 / 15)
    assert fit.beta > 0  # longer answers won more often
    # the default light penalty barely moves it
    assert length_controlled_win_rate(prefs, model, base).lc_win_rate == pytest.approx(expected, abs=0.2)


def test_lc_sign_convention_does_not_matter():
    prefs, model, base = _two_group_table()
    a = length_controlled_win_rate(prefs, model, base, C=None)
    # AlpacaEval's delta is baseline minus model: mirror lengths around the baseline
    mirrored = [2 * b - m for m, b in zip(model, base)]
    b = length_controlled_win_rate(prefs, mirrored, base, C=None)
    assert a.lc_win_rate == pytest.approx(b.lc_win_rate, abs=1e-6)
    assert a.beta == pytest.approx(-b.beta, abs=1e-4)


def test_lc_equals_raw_without_length_differences():
    prefs = [1, 1, 0.5, 0, 1, 0.75, 0.25, 1]
    same = [100] * len(prefs)
    fit = length_controlled_win_rate(prefs, same, same, C=None)
    assert fit.lc_win_rate == pytest.approx(np.mean(prefs) * 100, abs=1e-6)
    assert fit.beta == 0


def _irls(X, y, iters=100):
    """Independent Newton-Raphson fit of a soft-label logistic regression (test oracle)."""
    w = np.zeros(X.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        H = X.T @ (X * (p * (1 - p))[:, None])
        w = w + np.linalg.solve(H, X.T @ (y - p))
    return w


def test_lc_with_difficulty_matches_separate_newton_fit():
    rng = np.random.default_rng(3)
    n = 60
    diff = rng.normal(size=n)
    d = rng.normal(scale=200, size=n)
    x = np.tanh(d / d.std(ddof=1))
    true_p = 1 / (1 + np.exp(-(0.3 + 1.2 * x + 0.8 * diff)))
    y = (rng.random(n) < true_p).astype(float)
    y[::7] = 0.5  # some ties
    base = np.full(n, 1000.0)
    fit = length_controlled_win_rate(y, base + d, base, difficulty=diff, C=None)
    w = _irls(np.column_stack([np.ones(n), x, diff]), y)
    expected = np.mean(1 / (1 + np.exp(-(w[0] + w[2] * diff)))) * 100
    assert fit.theta == pytest.approx(w[0], abs=1e-4)
    assert fit.beta == pytest.approx(w[1], abs=1e-4)
    assert fit.lc_win_rate == pytest.approx(expected, abs=1e-3)


def test_lc_separable_table_stays_finite():
    fit = length_controlled_win_rate([1, 1, 1, 1], [10, 20, 30, 40], [5, 5, 5, 5])
    assert 90 < fit.lc_win_rate <= 100 and math.isfinite(fit.theta)


def test_lc_rejects_bad_input():
    with pytest.raises(ValueError):
        length_controlled_win_rate([1.5], [1], [1])
    with pytest.raises(ValueError):
        length_controlled_win_rate([1, 0], [1], [1, 2])


def test_win_rate():
    assert win_rate([1, 0, 0.5, 0.5]) == 50.0


def test_bootstrap_ci_sanity():
    rng = np.random.default_rng(0)
    y = (rng.random(200) < 0.7).astype(float)
    lo, hi = bootstrap_ci(len(y), lambda i: y[i].mean() * 100, n_resamples=2000)
    point = y.mean() * 100
    assert lo < point < hi
    # close to the normal approximation's 95% interval
    se = math.sqrt(point / 100 * (1 - point / 100) / len(y)) * 100
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.2)
    # more data -> narrower
    y4 = np.tile(y, 4)
    lo4, hi4 = bootstrap_ci(len(y4), lambda i: y4[i].mean() * 100, n_resamples=2000)
    assert hi4 - lo4 < (hi - lo) * 0.7
    # no variation -> a point
    assert bootstrap_ci(5, lambda i: 100.0) == (100.0, 100.0)


def test_summarize_report_fields():
    prefs, model, base = _two_group_table()
    rep = summarize("sft", "base", prefs, model, base, n_resamples=300, inconsistent=2)
    assert rep.n == 15 and rep.wins == 10 and rep.losses == 5 and rep.inconsistent == 2
    assert rep.win_rate_ci[0] <= rep.win_rate <= rep.win_rate_ci[1]
    assert rep.lc_win_rate_ci[0] <= rep.lc_win_rate <= rep.lc_win_rate_ci[1] + 1e-6
    assert rep.to_json()["model"] == "sft"


@pytest.mark.parametrize("text,expected", [
    ("A is more complete.\n[[A]]", "A"),
    ("Both fine. [[C]]", "tie"),
    ("First [[B]] ... on reflection [[A]]", "A"),
    ("My verdict: B", "B"),
    ("Answer B is clearly better because it is correct.", "B"),
    ("B", "B"),
    ("It's a tie.", "tie"),
    ("I cannot decide.", None),
    ("", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text).verdict == expected


@pytest.mark.parametrize("text,expected", [
    ("Good answer. Rating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("I'd say 6/10.", 6.0),
    ("Rating: 9", 9.0),
    ("The score is 4", 4.0),
    ("Rating: [[11]]", None),   # out of range: an abstention, never clipped
    ("Rating: [[0]]", None),
    ("no number here", None),
])
def test_parse_rating(text, expected):
    assert parse_rating(text) == expected


def test_grading_summary_and_prompt():
    s = grading_summary({"a": [8, None, 6], "b": [None]}, {"b": 2})
    assert s["a"] == {"mean": 7, "n": 2, "abstained": 1, "failed": 0} and s["b"]["mean"] is None
    assert s["b"]["failed"] == 2   # a judge error is a failure, never an abstention
    msgs = pairwise_messages([{"role": "user", "content": "hi"}], "one", "two")
    assert "[[A]]" in msgs[0]["content"] and "one" in msgs[1]["content"] and "two" in msgs[1]["content"]


def test_an_interval_including_half_is_no_measurable_difference():
    assert conclusion((40.0, 80.0), 10) == "no measurable difference"
    assert conclusion((50.0, 80.0), 10) == "no measurable difference"   # touching 50 is not a win
    assert conclusion((55.0, 80.0), 10) == "better" and conclusion((10.0, 45.0), 10) == "worse"
    assert conclusion((100.0, 100.0), MIN_PROMPTS_FOR_CI - 1).startswith("too few prompts to tell")
    # a 60% win rate on 10 prompts: its interval includes 50, and every printed line says so
    rep = summarize("sft", "base", [1.0] * 6 + [0.0] * 4, [100] * 10, [100] * 10, n_resamples=300).to_json()
    assert rep["win_rate_ci"][0] < 50 < rep["win_rate_ci"][1]
    assert rep["conclusion"] == rep["lc_conclusion"] == "no measurable difference"
    assert format_winrate(rep).startswith("sft vs base: no measurable difference (win rate 60.0% [")


def test_one_or_no_judged_prompt_is_never_a_win():
    one = summarize("sft", "base", [1.0], [10], [5], n_resamples=100)
    assert one.win_rate == 100.0 and one.win_rate_ci == (100.0, 100.0)   # a point: the bootstrap has nothing to resample
    assert one.conclusion.startswith("too few prompts") and one.lc_conclusion.startswith("too few prompts")
    none = summarize("sft", "base", [], [], [], abstained=3, failed=1, missing=2).to_json()
    assert none["n"] == 0 and none["win_rate"] is None and none["abstained"] == 3
    assert none["conclusion"] == "no verdict: none of the pairs was judged (3 abstained, 1 failed, 2 missing an answer)"
    assert "3 abstained, 1 failed, 2 missing" in format_winrate(none) and "win rate -" in format_winrate(none)


def test_bootstrap_resamples_prompts_not_samples():
    # 10 prompts, 5 sampled answers each with the same verdict: 50 rows, but only 10 independent prompts
    per_prompt = np.array([1.0] * 7 + [0.0] * 3)
    y = np.repeat(per_prompt, 5)
    groups = np.repeat([f"p{i}" for i in range(10)], 5)
    stat = lambda i: y[i].mean() * 100  # noqa: E731
    by_prompt = bootstrap_ci(10, lambda i: per_prompt[i].mean() * 100, n_resamples=500)
    assert bootstrap_ci(50, stat, n_resamples=500, groups=list(groups)) == pytest.approx(by_prompt)
    lo, hi = bootstrap_ci(50, stat, n_resamples=500)   # rows as if independent: too narrow
    assert hi - lo < 0.6 * (by_prompt[1] - by_prompt[0])
    rep = summarize("sft:sampled", "base:sampled", y, [1] * 50, [1] * 50, prompt_ids=list(groups), n_resamples=500)
    assert rep.n == 50 and rep.prompts == 10 and rep.win_rate_ci == pytest.approx(by_prompt)
    # seeded: the same call gives the same interval
    assert summarize("a", "b", y, [1] * 50, [1] * 50, prompt_ids=list(groups), n_resamples=500).win_rate_ci == rep.win_rate_ci


def test_a_verdict_readable_in_one_order_only_is_counted():
    from moaa.pipeline.eval.judges import _combine

    v = _combine(1.0, None, ("A", None), {})
    assert v.preference == 1.0 and v.abstained_orders == 1 and not v.inconsistent
    assert _combine(None, None, (None, None), {}).preference is None
    assert _combine(1.0, None, ("m > b",), {}, asked=1).abstained_orders == 0   # one order asked by design
    rep = summarize("sft", "base", [1.0] * 8, [1] * 8, [1] * 8, one_order=3, n_resamples=100).to_json()
    assert rep["one_order"] == 3 and "3 decided by one order" in format_winrate(rep)


def test_intervals_do_not_depend_on_the_order_rows_were_written(tmp_path):
    """A resumed eval appends the rows it redid after the others: same verdicts, same intervals and
    conclusions (both from the `--bootstrap` resamples, the length-controlled one too)."""
    from moaa.pipeline.eval.run import winrates_from_store
    from moaa.pipeline.store import DatasetStore
    rng = np.random.default_rng(5)
    rows = [{"id": f"m~b~p{i:02d}", "prompt_id": f"p{i:02d}", "model": "m", "baseline": "b",
             "preference": float(rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.1, 0.6])), "len_model": int(rng.integers(50, 400)),
             "len_baseline": int(rng.integers(50, 400)), "inconsistent": False} for i in range(14)]
    results = []
    for name, order in (("straight", rows), ("resumed", rows[5:] + rows[:5])):
        store = DatasetStore(tmp_path / name, stage="eval", fmt="generations").open()
        for row in order:
            store.write(dict(row))
        results.append(winrates_from_store(store, [("m", "b")], n_resamples=300))
    assert results[0] == results[1]


@pytest.mark.parametrize("prefs,expected", [
    ([1.0] * 6 + [0.0], "no measurable difference (the interval excludes 50 but the sign test gives p = 0.12)"),
    ([1.0] * 5 + [0.5], "no measurable difference (the interval excludes 50 but the sign test gives p = 0.062)"),
    ([1.0] * 6, "better"),
    ([0.0] * 9 + [1.0, 0.5], "worse"),
])
def test_a_difference_needs_the_sign_test_too(prefs, expected):
    """At a few prompts the percentile interval is too narrow (6 wins and 1 loss: [57, 100], yet the sign
    test gives p = 0.125): a result is claimed only when both agree."""
    from scipy.stats import binomtest
    rep = summarize("m", "b", prefs, [10.0] * len(prefs), [10.0] * len(prefs), n_resamples=500)
    won, lost = sum(p > 0.5 for p in prefs), sum(p < 0.5 for p in prefs)
    assert rep.sign_test_p == pytest.approx(binomtest(won, won + lost).pvalue)
    assert rep.conclusion == expected
