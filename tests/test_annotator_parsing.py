"""Pure parts of the annotator: parsing corpus, templates, statistics, criteria filtering, decisions."""
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moaa.services.annotator import combine as cb
from moaa.services.annotator import stats
from moaa.services.annotator.parsing import parse_ratings, parse_single_score, parse_verdict
from moaa.services.annotator.templates import TemplateError, TemplateStore, parse_template

# (judge output, expected score on 1..10 or None = unreadable)
SINGLE_CORPUS = [
    ("Score: 8", 8.0),                                         # well-formed
    ("Score: 8/10", 8.0),
    ("score = 7.5", 7.5),
    ("**9**", 9.0),
    ("The answer is accurate and clear.\n\nScore: 6", 6.0),    # extra prose before
    ("Rating: 4 because it misses the point", 4.0),
    ("I would give it 9 out of 10.", 9.0),
    (" 7\n\nQuestion: what else?", 7.0),                        # small model ran on after the number
    ('{"score": 3, "reason": "off-topic"}', 3.0),               # JSON
    ("```json\n{\"score\": 2}\n```", 2.0),                      # fenced JSON
    ("4/5", 8.2),                                              # other denominator: rescaled to the scale
    ("Score: 11", 10.0),                                       # slightly out of range: clipped
    ("Score: 0", 1.0),
    ("Score: 85", None),                                       # far out of range: rejected
    ("Score: -40", None),
    ("The answer is good.", None),                             # none at all
    ("1. First, the answer mentions Paris", None),             # a list number is not a score
    ("", None),
]


@pytest.mark.parametrize("text,expected", SINGLE_CORPUS)
def test_single_score_corpus(text, expected):
    parsed = parse_single_score(text, 1, 10)
    if expected is None:
        assert parsed.score is None and parsed.error
    else:
        assert parsed.score == pytest.approx(expected) and parsed.error is None


RATINGS_CORPUS = [
    ('{"criteria": ["accuracy"], "ratings": [{"answer": 1, "criteria": {"accuracy": 9}, "score": 9, "reason": "ok"},'
     ' {"answer": 2, "criteria": {"accuracy": 2}, "score": 2, "reason": "bad"}]}', {1: 9, 2: 2}),
    ('Here is my judgement:\n```json\n{"ratings": [{"answer": 2, "score": 3}, {"answer": 1, "score": 8}]}\n```\nThanks',
     {1: 8, 2: 3}),
    ('{"1": 7, "2": {"score": 4}}', {1: 7, 2: 4}),
    ('[8, 3]', {1: 8, 2: 3}),
    ("Answer 1: 8/10 - correct.\nAnswer 2: 3/10 - off-topic.", {1: 8, 2: 3}),
    ("**Answer 1**: Score: 9\n**Answer 2**: Score: 2", {1: 9, 2: 2}),
    ("[[1]] 7\n[[2]] 5", {1: 7, 2: 5}),
    ('{"ratings": [{"answer": 1, "score": 11}, {"answer": 2, "score": 1}]}', {1: 10, 2: 1}),
    ('{"ratings": [{"answer": 1, "criteria": {"a": 6, "b": 8}}, {"answer": 2, "criteria": {"a": 2, "b": 2}}]}',
     {1: 7, 2: 2}),                                            # overall missing: mean of criteria
]


@pytest.mark.parametrize("text,expected", RATINGS_CORPUS)
def test_ratings_corpus(text, expected):
    parsed = parse_ratings(text, 2, 1, 10)
    assert parsed.error is None, parsed.error
    assert parsed.scores == pytest.approx({k: float(v) for k, v in expected.items()})


def test_ratings_partial_and_unreadable():
    partial = parse_ratings("Answer 1: 8/10. The second one I cannot judge.", 2, 1, 10)
    assert partial.scores == {1: 8.0} and "answer(s) 2" in partial.error
    far = parse_ratings('{"ratings": [{"answer": 1, "score": 80}, {"answer": 2, "score": 1}]}', 2, 1, 10)
    assert 1 not in far.scores and "outside the scale" in far.error
    assert parse_ratings("Both answers are fine.", 2, 1, 10).error
    assert parse_ratings("", 2, 1, 10).error == "empty answer"


def test_ratings_criteria_read():
    parsed = parse_ratings('{"criteria": ["Accuracy", "clarity"], "ratings": [{"answer": 1, "criteria": '
                           '{"Accuracy": 9, "clarity": 7}, "score": 8}]}', 1, 1, 10)
    assert parsed.criteria_names == ["Accuracy", "clarity"]
    assert parsed.criteria[1] == {"Accuracy": 9.0, "clarity": 7.0}


VERDICT_CORPUS = [
    ("Answer A is more accurate.\n[[A]]", "A"),
    ("[[B]]", "B"),
    ("Both are equally good. [[tie]]", "tie"),
    ("At first [[A]] seemed better, but on reflection [[B]]", "B"),   # the last one counts
    ("Verdict: B", "B"),
    ("**Final verdict:** [A]", "A"),
    ("Assistant B is better because it answers the question.", "B"),
    ("A", "A"),
    ("It's a tie.", "tie"),
    ("The answer is B.", "B"),
    ("the answer is a mixture of both", None),                        # an article, not a verdict
    ("Both answers have strengths and weaknesses.", None),
    ("", None),
]


@pytest.mark.parametrize("text,expected", VERDICT_CORPUS)
def test_verdict_corpus(text, expected):
    parsed = parse_verdict(text)
    assert parsed.verdict == expected
    assert (parsed.error is None) == (expected is not None)


def test_verdict_read_from_a_repeated_answer():
    # small judges answer "which is better?" by repeating the answer they prefer, under any label
    answers = ("Die Sonne scheint heute.", "A spider has eight legs.")
    assert parse_verdict("A: A spider has eight legs.", answers).verdict == "B"
    assert parse_verdict("Die Sonne scheint heute.", answers).verdict == "A"
    assert parse_verdict("Both mention legs and Sonne.", answers).verdict is None
    assert parse_verdict("[[A]] A spider has eight legs.", answers).verdict == "A"   # an explicit verdict wins


def test_c_verdict_is_a_tie():
    # `moaa eval` asks for [[C]] as a tie and reads verdicts with this parser
    assert parse_verdict("Both are fine. [[C]]").verdict == "tie"


def test_builtin_templates_load_render_and_hash(tmp_path):
    store = TemplateStore()
    assert {"pointwise_v1", "pointwise_single_v1", "pairwise_v1", "aggregator_v1"} <= set(store.names())
    tpl = store.get("pairwise_v1")
    assert tpl.kind == "pairwise" and len(tpl.sha256) == 64
    msgs = tpl.render(instruction="Q?", answer_a="x {json}", answer_b="y")
    assert msgs[0]["role"] == "system" and "x {json}" in msgs[1]["content"]
    with pytest.raises(TemplateError, match="needs values"):
        tpl.render(instruction="Q?")
    # an override folder wins, and a changed file changes the hash
    (tmp_path / "pairwise_v1.txt").write_text("kind: pairwise\n[user]\n$instruction $answer_a $answer_b\n")
    over = TemplateStore([tmp_path]).get("pairwise_v1")
    assert over.sha256 != tpl.sha256 and over.system == ""
    with pytest.raises(TemplateError, match="unknown judge template"):
        store.get("nope")
    with pytest.raises(TemplateError, match="kind must be"):
        parse_template("bad", b"kind: vibes\n[user]\nx\n")
    with pytest.raises(TemplateError, match="no \\[user\\]"):
        parse_template("bad", b"kind: pairwise\n")


def test_permutation_is_seeded_and_per_judge():
    assert stats.permutation(5, 42) == stats.permutation(5, 42)
    assert sorted(stats.permutation(5, 42)) == list(range(5))
    assert stats.judge_seed(1, "a") == stats.judge_seed(1, "a") != stats.judge_seed(1, "b")
    orders = {tuple(stats.permutation(5, s)) for s in range(20)}
    assert len(orders) > 10


_scores = st.lists(st.one_of(st.none(), st.integers(1, 10), st.floats(0, 10, allow_nan=False)), min_size=0,
                   max_size=16)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_rank_correlations_agree_with_scipy(data):
    """kendall_tau (tau-b) and spearman are computed in stats.py for speed; scipy is the reference."""
    from scipy import stats as sp

    a = data.draw(_scores)
    b = data.draw(st.lists(st.one_of(st.none(), st.integers(1, 10), st.floats(0, 10, allow_nan=False)),
                           min_size=len(a), max_size=len(a)))
    x = [u for u, v in zip(a, b) if u is not None and v is not None]
    y = [v for u, v in zip(a, b) if u is not None and v is not None]
    defined = len(set(x)) > 1 and len(set(y)) > 1
    tau, rho = stats.kendall_tau(a, b), stats.spearman(a, b)
    if not defined or len(x) < 2:
        assert tau is None
    else:
        assert tau == pytest.approx(sp.kendalltau(x, y).statistic, abs=1e-9)
    if not defined or len(x) < 3:
        assert rho is None
    else:
        assert rho == pytest.approx(sp.spearmanr(x, y).statistic, abs=1e-9)


def test_statistics():
    assert stats.kendall_tau([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert stats.kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.kendall_tau([1, None, 3], [1, 5, None]) is None       # fewer than two common items
    assert stats.kendall_tau([1, 1, 1], [1, 2, 3]) is None             # constant: undefined, not 0
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    overall, per = stats.agreement({"a": [1, 2, 3], "b": [1, 2, 3], "c": [3, 2, 1]})
    assert overall == pytest.approx(-1 / 3) and per["a"] == pytest.approx(0.0) and per["c"] == pytest.approx(-1.0)
    assert stats.position_bias_pairwise(["A", "A", "B", "tie", None]) == pytest.approx(2 / 3)
    assert stats.position_bias_pointwise([9, 5, 1]) == 1.0
    assert stats.position_bias_pointwise([5, 5]) is None
    assert stats.order_flip_rate([("A", "B"), ("A", "A"), (None, "A")]) == 0.5


def _judge(name, scores, criteria=None, weight=1.0):
    n = len(scores)
    return cb.JudgeResult(name=name, model=name, weight=weight, scores=scores,
                          criteria=criteria or [{} for _ in range(n)])


def test_criteria_filter_disagreement_and_length():
    a = _judge("a", [9, 2, 5, 6, 7], [{"acc": 9, "len": 1}, {"acc": 2, "len": 2}, {"acc": 5, "len": 3},
                                        {"acc": 6, "len": 4}, {"acc": 7, "len": 5}])
    b = _judge("b", [8, 1, 5, 6, 8], [{"acc": 8, "style": 1}, {"acc": 1, "style": 10}, {"acc": 5, "style": 1},
                                        {"acc": 6, "style": 10}, {"acc": 8, "style": 1}])
    infos = {c.name: c for c in cb.filter_criteria([a, b], [10, 20, 30, 40, 50], cb.FilterSettings())}
    assert infos["acc"].kept and infos["acc"].disagreement == pytest.approx(0.6)
    assert not infos["len"].kept and "length" in infos["len"].reason
    assert not infos["style"].kept and "disagree" in infos["style"].reason   # one judge, far from the others
    kept = {k for k, c in infos.items() if c.kept}
    assert cb.effective_scores(a, kept) == [9, 2, 5, 6, 7]
    # filtering switched off: reported, nothing dropped
    assert all(c.kept for c in cb.filter_criteria([a, b], [10, 20, 30, 40, 50], cb.FilterSettings(enabled=False)))
    # too few answers for a length correlation
    assert cb.filter_criteria([a], [1, 2, 3], cb.FilterSettings())[0].length_correlation is None


def test_combine_rules():
    scores = {"a": [8.0, 2.0, None], "b": [6.0, 4.0, 5.0]}
    assert cb.combine(scores, {"a": 3.0}, "mean") == [7.0, 3.0, 5.0]
    assert cb.combine(scores, {"a": 3.0, "b": 1.0}, "weighted") == [7.5, 2.5, 5.0]


def test_decide_and_skip_reasons():
    rules = cb.SkipRules(min_margin=1.0, min_agreement=0.0, max_abstain_fraction=0.5)
    d = cb.decide(["x", "y", "z"], [9.0, 2.0, 5.0], 0.5, [0, 0, 0], 3, rules)
    assert (d.chosen, d.rejected, d.margin, d.ranks, d.skipped) == (0, 1, 7.0, [1, 3, 2], False)
    assert "margin 0.50 below" in cb.decide(["x", "y"], [5.5, 5.0], 1.0, [0, 0], 3, rules).skip_reason
    assert "disagree" in cb.decide(["x", "y"], [9.0, 1.0], -0.5, [0, 0], 3, rules).skip_reason
    assert "abstentions: 2 of 3 judges gave no readable score (" in cb.decide(
        ["x", "y"], [9.0, 1.0], None, [2, 2], 3, rules).skip_reason
    assert "only 1 candidate" in cb.decide(["x", "y"], [9.0, None], None, [0, 1], 3, rules).skip_reason
    same = cb.decide(["x", "y"], [5.0, 5.0], None, [0, 0], 1, cb.SkipRules(min_margin=0.0))
    assert same.skipped and "same" in same.skip_reason
    # ties at the top are broken by candidate id, so input order never changes the pair; equal scores share a rank
    d1 = cb.decide(["p", "q", "r"], [9.0, 9.0, 1.0], None, [0, 0, 0], 1, rules)
    d2 = cb.decide(["q", "p", "r"], [9.0, 9.0, 1.0], None, [0, 0, 0], 1, rules)
    assert ["p", "q", "r"][d1.chosen] == ["q", "p", "r"][d2.chosen] == "p"
    assert d1.ranks == [1, 1, 3] and not math.isnan(d1.margin)


def test_an_answer_the_judges_could_not_read_is_not_silently_left_out():
    """Every judge abstaining on one answer (it may be the best) is too many abstentions, whatever the others
    scored; with fewer than max_abstain_fraction of the judges the pair is decided from what they read."""
    rules = cb.SkipRules(min_margin=0.5, max_abstain_fraction=0.0)
    d = cb.decide(["a", "b", "c"], [None, 3.5, 5.5], None, [2, 0, 0], 2, rules)
    assert d.skipped and d.skip_reason == ("too_many_abstentions: 2 of 2 judges gave no readable score for answer "
                                           "'a' (max_abstain_fraction 0)")
    d = cb.decide(["a", "b", "c"], [8.0, 3.5, 5.5], None, [1, 0, 0], 3, cb.SkipRules(max_abstain_fraction=0.5))
    assert not d.skipped and d.chosen == 0


def test_a_margin_equal_to_min_margin_is_kept_whatever_the_rounding():
    a, b = (16 / 3 + 5) / 2, (14 / 3 + 14 / 3) / 2    # exactly 31/6 and 14/3: a margin of 1/2
    assert a - b < 0.5
    d = cb.decide(["a", "b"], [a, b], None, [0, 0], 2, cb.SkipRules(min_margin=0.5))
    assert not d.skipped and d.chosen == 0


def test_a_template_moaa_cannot_fill_is_refused_when_loaded(tmp_path):
    """Unknown placeholders, a bare '$' and a template that never shows the answers fail at load (so at the
    annotator's start), naming the file; not as INTERNAL at every request."""
    for body, needle in (("$instruction $candidates $bogus", "uses $bogus, which moaa does not fill"),
                         ("$instruction $candidates costs $5", "'$' on line 1 of its section is not followed"),
                         ("$instruction only", "never shows the judge $candidates")):
        (tmp_path / "mine.txt").write_text(f"kind: pointwise\n[user]\n{body}\n")
        with pytest.raises(TemplateError, match=re.escape(needle)) as err:
            TemplateStore([tmp_path]).get("mine")
        assert str(tmp_path / "mine.txt") in str(err.value)
    with pytest.raises(TemplateError, match=re.escape("never shows the judge $ratings")):
        parse_template("agg", b"kind: aggregator\n[user]\n$candidates\n")
    assert parse_template("ok", b"kind: pointwise\n[user]\n$instruction $candidates costs $$5\n").render(
        instruction="Q", candidates="A", n=1, scale_min=1, scale_max=10)[0]["content"] == "Q A costs $5"
    with pytest.raises(TemplateError, match="is not a folder"):
        TemplateStore([tmp_path / "typo"])


def test_fractions_in_json_are_put_on_the_ensembles_scale():
    """ "80/100" is 80 on 1..100 and "4/5" is 4 on 0..5, in JSON as in text (a JSON fraction was read out of
    10 whatever the scale)."""
    r = parse_ratings('{"ratings": [{"answer": 1, "score": "80/100", "criteria": {"acc": "90/100"}}, '
                      '{"answer": 2, "score": "30/100"}]}', 2, 1, 100)
    assert r.scores == {1: 80.0, 2: 30.0} and r.criteria[1] == {"acc": 90.0}
    r = parse_ratings('[{"score": "4/5"}, {"score": "1/5"}, {"score": "0/5"}]', 3, 0, 5)
    assert r.scores == {1: 4.0, 2: 1.0, 3: 0.0}
    assert parse_single_score('{"score": "80/100", "reason": "ok"}', 1, 100).score == 80.0
    json_path, text_path = parse_ratings('["4/5"]', 1, 1, 10).scores[1], parse_single_score("Score: 4/5", 1, 10).score
    assert json_path == text_path == pytest.approx(8.2)


def test_out_of_scale_tolerance_is_a_share_of_the_scale():
    """One point on 1..10 (0 and 11 are clipped), the same share elsewhere: 1.9 on 0..1 is refused."""
    assert parse_single_score("Score: 11", 1, 10).score == 10 and parse_single_score("Score: 0", 1, 10).score == 1
    assert parse_single_score("Score: 1.1", 0, 1).score == 1
    for text in ("Score: 1.9", "Score: 2"):
        got = parse_single_score(text, 0, 1)
        assert got.score is None and "outside the scale 0..1" in got.error
