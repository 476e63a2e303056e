"""The annotator as a real grpc.aio server against the judge emulator on 127.0.0.1."""
import asyncio
import math
import re

import grpc
import pytest

from moaa.services.annotator.server import start_annotator
from moaa.services.annotator.templates import TemplateStore
from moaa.services.config import parse_config
from moaa.v1 import annotator_pb2
from tests.fixtures.annotator import judge_config, request

GOOD, BAD, OK = "Paris is the capital of France.", "Bananas are yellow and rich in potassium, eat them daily.", "paris."


async def test_moa_mode_picks_good_and_bad_and_records_provenance(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"j1": "keyword:paris", "j2": "keyword:capital+text", "j3": "keyword:france"},
        aggregator="keyword:paris", min_margin=1.0))
    resp = await stub.Annotate(request([BAD, GOOD, OK], id="row-1"))
    assert (resp.chosen_id, resp.rejected_id, resp.skipped) == ("c1", "c0", False)
    assert resp.mode == "moa" and resp.combine == "aggregator" and resp.ensemble == "e" and resp.id == "row-1"
    assert resp.margin >= 1.0 and resp.agreement > 0.5
    hashes = {t: TemplateStore().get(t).sha256 for t in ("pointwise_v1", "aggregator_v1")}
    assert [j.judge for j in resp.judges] == ["j1", "j2", "j3", "agg"]
    for rep in resp.judges:
        assert rep.template_hash == hashes[rep.template] and rep.requests == 1 and rep.abstentions == 0
        assert sorted(rep.order) == [0, 1, 2] and {s.candidate_id for s in rep.scores} == {"c0", "c1", "c2"}
    assert len({tuple(r.order) for r in resp.judges}) > 1, "each judge sees its own permutation"
    assert {c.name for c in resp.criteria} == {"accuracy", "clarity"}
    assert sum(u.requests for u in resp.usage) == 4
    # the seed is recorded; the same seed reproduces every judge's order
    again = await stub.Annotate(request([BAD, GOOD, OK], id="row-1", seed=resp.seed))
    assert [list(j.order) for j in again.judges] == [list(j.order) for j in resp.judges]


async def test_position_biased_judge_detected_and_choice_independent_of_order(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"fair": "keyword:paris", "biased": "first"}, mode="pairwise", combine="mean",
        min_margin=0.5))
    cands = [GOOD, BAD, "Rome is a nice city in Italy."]
    chosen = set()
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2], [1, 2, 0]):
        req = annotator_pb2.AnnotateRequest(prompt=request([]).prompt, candidates=[
            annotator_pb2.Candidate(id=f"c{i}", text=cands[i]) for i in order])
        resp = await stub.Annotate(req)
        reports = {j.judge: j for j in resp.judges}
        assert reports["biased"].position_bias == 1.0 and reports["biased"].order_flip_rate == 1.0
        assert reports["fair"].position_bias == 0.5 and reports["fair"].order_flip_rate == 0.0
        # both orders asked: the biased judge's verdicts cancel out (every candidate wins half)
        assert {s.score for s in reports["biased"].scores} == {5.5}
        assert reports["biased"].requests == 6                     # 3 pairs x 2 orders
        chosen.add(resp.chosen_id)
    assert chosen == {"c0"}


async def test_unreadable_answer_retried_once_then_abstention(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"flaky": "keyword:paris+flaky", "mute": "garbage", "ok": "keyword:paris"},
        mode="pointwise", combine="mean"))
    resp = await stub.Annotate(request([GOOD, BAD]))
    reps = {j.judge: j for j in resp.judges}
    assert reps["flaky"].requests == 2 and reps["flaky"].abstentions == 0      # read on the retry
    assert reps["mute"].requests == 2 and reps["mute"].abstentions == 2        # never counted as a score
    for s in reps["mute"].scores:
        assert s.abstained and math.isnan(s.score) and "unreadable after one retry" in s.abstain_reason
    assert (resp.chosen_id, resp.rejected_id) == ("c0", "c1")
    # combined only from the judges that scored
    assert [round(c.score, 3) for c in resp.combined] == [round(s.score, 3) for s in reps["ok"].scores]


async def test_too_many_abstentions_skips_with_reason(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"a": "garbage", "b": "garbage", "c": "keyword:paris"}, mode="pointwise", combine="mean"))
    resp = await stub.Annotate(request([GOOD, BAD]))
    assert resp.skipped and resp.skip_reason.startswith("too_many_abstentions: 2 of 3")
    assert resp.chosen_id == "" and resp.rejected_id == ""


async def test_small_margin_and_aggregator_fallback(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"a": "keyword:zzz"}, aggregator="garbage", min_margin=0.5))
    resp = await stub.Annotate(request([GOOD, BAD]))
    assert resp.skipped and "same" in resp.skip_reason
    assert resp.combine == "weighted" and "aggregator judge gave no readable score" in resp.note


FOUR = [GOOD, "Paris.", "The answer to that is Rome, I believe, which is in Italy.", "Lyon?"]


async def test_returned_scores_are_the_ones_combined_and_measured(judge_emulator, annotator_factory):
    """Judges whose overall score disagrees with their own criteria ratings: the criteria filter keeps the
    criteria, so each judge's score is its criteria mean; every number returned recomputes from the
    returned scores (scipy as the reference), and the overall rating as written is kept beside it."""
    from scipy import stats as sp
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"a": "longest+overall=first", "b": "keyword:paris+overall=longest", "c": "first"},
        mode="pointwise", combine="mean", max_criterion_disagreement=100.0, min_margin=0.0))
    resp = await stub.Annotate(request(FOUR, seed=11))
    assert all(c.kept for c in resp.criteria)
    scores = {j.judge: [s.score for s in j.scores] for j in resp.judges}
    assert [s.overall for s in resp.judges[0].scores] != scores["a"], "the overall rating is kept as written"
    for j in resp.judges:
        for s in j.scores:
            assert s.score == pytest.approx(sum(s.criteria.values()) / len(s.criteria))
    combined = [c.score for c in resp.combined]
    assert combined == pytest.approx([sum(col) / 3 for col in zip(*scores.values())])
    assert resp.margin == pytest.approx(max(combined) - min(combined))
    lengths = [len(t) for t in FOUR]
    taus = {}
    for x in scores:
        for y in scores:
            if x < y:
                taus[x, y] = sp.kendalltau(scores[x], scores[y]).statistic
    assert resp.agreement == pytest.approx(sum(taus.values()) / len(taus))
    for j in resp.judges:
        assert j.length_correlation == pytest.approx(sp.spearmanr(scores[j.judge], lengths).statistic)
        assert j.agreement == pytest.approx(sum(t for k, t in taus.items() if j.judge in k) / 2)
        shown = [scores[j.judge][i] for i in j.order]   # earlier-shown scored higher, over non-tied pairs
        pairs = [(shown[p] > shown[q]) for p in range(4) for q in range(p + 1, 4) if shown[p] != shown[q]]
        assert j.position_bias == pytest.approx(sum(pairs) / len(pairs))


async def test_judges_tokens_are_counted_in_the_metrics(judge_emulator, annotator_factory):
    from prometheus_client import REGISTRY

    def tokens():
        return REGISTRY.get_sample_value("moaa_tokens_total", {"service": "annotator", "model": "m-tk",
                                                               "kind": "completion"}) or 0.0

    stub = await annotator_factory(judge_config(judge_emulator.url, {"tk": "keyword:paris"}, mode="pointwise"))
    before = tokens()
    resp = await stub.Annotate(request([GOOD, BAD]))
    assert tokens() == before + sum(u.usage.completion_tokens for u in resp.usage) > before


async def test_moa_mode_says_when_no_aggregator_decided(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "longest"},
                                                combine="mean"))
    resp = await stub.Annotate(request([GOOD, BAD], mode="moa"))
    assert resp.mode == "moa" and resp.combine == "mean" and [j.judge for j in resp.judges] == ["a", "b"]
    assert "mode 'moa' but no aggregator judge decided (ensemble 'e' has no aggregator judge)" in resp.note


async def test_the_aggregator_judges_statistics_are_measured(judge_emulator, annotator_factory):
    from scipy import stats as sp
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris", "b": "first"},
                                                aggregator="longest"))
    resp = await stub.Annotate(request(FOUR, seed=3))
    agg = resp.judges[-1]
    assert agg.judge == "agg" and resp.combine == "aggregator"
    mine = [s.score for s in agg.scores]
    assert agg.length_correlation == pytest.approx(sp.spearmanr(mine, [len(t) for t in FOUR]).statistic)
    others = [[s.score for s in j.scores] for j in resp.judges[:-1]]
    assert agg.agreement == pytest.approx(sum(sp.kendalltau(mine, o).statistic for o in others) / 2)


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.candidates.__delitem__(slice(1, None)), "candidates has 1 entry: send at least 2"),
    (lambda r: r.candidates.add(id="c9", text=" \n "), "candidates[3] is empty"),
    (lambda r: [r.candidates.add(id=f"x{i}", text="x") for i in range(3)], "over max_candidates=4"),
    (lambda r: r.candidates.add(id="big", text="x" * 3000), "over max_candidate_bytes=2000"),
    (lambda r: r.candidates.add(id="c0", text="dup"), "unique"),
    (lambda r: r.candidates.add(id="c9", text=" " + GOOD), "candidates 'c0' and 'c9' have the same text"),
    (lambda r: setattr(r, "ensemble", "nope"), "unknown ensemble 'nope'"),
    (lambda r: r.judges.append("ghost"), "unknown judge(s) 'ghost'"),
    (lambda r: setattr(r, "mode", "vibes"), "mode 'vibes' is unknown"),
    (lambda r: r.prompt.pop(), "prompt is empty"),
])
async def test_validation_errors(judge_emulator, annotator_factory, mutate, message):
    stub = getattr(test_validation_errors, "stub", None)
    if stub is None:
        stub = test_validation_errors.stub = await annotator_factory(judge_config(
            judge_emulator.url, {"a": "keyword:paris"},
            annotator={"max_candidates": 4, "max_candidate_bytes": 2000, "max_request_bytes": 8192}))
    req = request([GOOD, BAD, OK])
    mutate(req)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


async def test_request_over_max_request_bytes_refused(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"},
                                                annotator={"max_request_bytes": 4096}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(request([GOOD, "y" * 5000]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_annotate_stream_bounded_window_and_item_errors(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris+delay=0.05"},
                                                mode="pointwise", combine="mean", annotator={"batch_window": 2}))
    judge_emulator.reset()

    async def items():
        for i in range(6):
            yield request([GOOD, BAD] if i != 3 else [GOOD], id=f"r{i}")

    results = [r async for r in stub.AnnotateStream(items())]
    assert sorted(r.id for r in results) == [f"r{i}" for i in range(6)]
    by_id = {r.id: r for r in results}
    assert by_id["r3"].WhichOneof("result") == "error" and by_id["r3"].error.code == "INVALID_ARGUMENT"
    assert all(by_id[f"r{i}"].response.chosen_id == "c0" for i in (0, 1, 2, 4, 5))
    assert judge_emulator.stats.models["keyword:paris+delay=0.05"].max_in_flight <= 2


async def test_annotate_stream_items_carry_the_call_request_id(judge_emulator, annotator_factory, caplog):
    """As GenerateBatch's: an item's own request_id, else the stream call's id and the item id, so the
    items' log lines are found under the call's."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, mode="pointwise"))
    items = [request([GOOD, BAD], id="r1"), request([GOOD, BAD], id="r2"),
             request([GOOD, BAD], id="r3", request_id="mine")]
    with caplog.at_level("INFO", logger="moaa.rpc"):
        results = {r.id: r.response.request_id async for r in stub.AnnotateStream(iter(items), timeout=20)}
    call_rid = next(r.request_id for r in caplog.records if getattr(r, "method", "") == "AnnotateStream")
    assert results == {"r1": f"{call_rid}-r1", "r2": f"{call_rid}-r2", "r3": "mine"}


async def test_caller_deadline_is_deadline_exceeded_not_a_judge_outage(judge_emulator, annotator_factory):
    """Judge calls cut by the caller's own deadline are no backend outage: UNAVAILABLE would be retried
    with the same deadline. The server's timers and gRPC's race, so several calls."""
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris+delay=5", "b": "keyword:paris"},
                                                mode="pointwise"))
    codes = []
    for timeout in (0.3, 0.2, 0.1, 0.05, 0.01) * 2:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Annotate(request([GOOD, BAD]), timeout=timeout)
        codes.append((err.value.code(), err.value.details()))
    assert {c for c, _ in codes} == {grpc.StatusCode.DEADLINE_EXCEEDED}, codes


async def test_stream_cancel_by_client(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris+delay=0.2"},
                                                mode="pointwise", combine="mean"))

    async def items():
        for i in range(50):
            yield request([GOOD, BAD], id=f"r{i}")

    call = stub.AnnotateStream(items())
    first = await call.read()
    assert first.response.chosen_id == "c0"
    call.cancel()
    await asyncio.sleep(0.3)
    assert stub.server.guard.limiter.in_flight == 0


async def test_pairwise_against_reference_and_single_answer_template(judge_emulator, annotator_factory):
    cfg = judge_config(judge_emulator.url, {"pair": "keyword:paris", "single": "keyword:paris"}, mode="moa",
                       combine="mean")
    cfg["ensembles"]["e"]["judges"][0]["template"] = "pairwise_v1"
    cfg["ensembles"]["e"]["judges"][1]["template"] = "pointwise_single_v1"
    stub = await annotator_factory(cfg)
    ref = annotator_pb2.Candidate(id="ref", text="Paris.")
    resp = await stub.Annotate(request([GOOD, BAD, "Lyon is nice."], reference=ref))
    reps = {j.judge: j for j in resp.judges}
    assert reps["pair"].requests == 6                  # each of 3 candidates vs the reference, both orders
    assert reps["pair"].template == "pairwise_v1" and reps["single"].template == "pointwise_single_v1"
    assert reps["single"].requests == 3                # one call per answer
    assert [s.score for s in reps["single"].scores] == [9.0, 2.0, 2.0]
    assert (resp.chosen_id, resp.skipped) == ("c0", False)
    # a subset of the judges, and a mode override: pointwise ignores the reference and says so
    resp = await stub.Annotate(request([GOOD, BAD], reference=ref, judges=["single"], mode="pointwise"))
    assert [j.judge for j in resp.judges] == ["single"] and resp.mode == "pointwise"
    assert "reference answer is used by pairwise judges only" in resp.note


async def test_aggregator_combine_needs_moa_mode(judge_emulator, annotator_factory):
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": "keyword:paris"}, aggregator="keyword:paris"))
    resp = await stub.Annotate(request([GOOD, BAD], mode="pairwise"))
    assert resp.combine == "weighted" and "mode is 'pairwise'" in resp.note
    assert [j.judge for j in resp.judges] == ["a"] and resp.chosen_id == "c0"


async def test_templates_that_cannot_serve_their_setting_are_refused_at_start(tmp_path):
    """A pairwise template as pointwise_template, a template with a placeholder moaa cannot fill, or a
    templates_dir that is not a folder: the annotator does not start (the CLI exits 2 with the message),
    instead of answering INTERNAL to every request."""
    from moaa.errors import UserError
    (tmp_path / "bogus.txt").write_text("kind: pointwise\n[user]\n$instruction $candidates $bogus\n")
    for ens, needle in (({"pointwise_template": "pairwise_v1"}, "pointwise_template 'pairwise_v1' is a pairwise"),
                        ({"aggregator_template": "pointwise_v1"}, "aggregator_template 'pointwise_v1' is a pointwise"),
                        ({"templates_dir": str(tmp_path), "judges": [{"name": "a", "model": "m-a", "template": "bogus"}]},
                         "uses $bogus, which moaa does not fill"),
                        ({"templates_dir": str(tmp_path / "tpl")}, "is not a folder")):
        cfg = judge_config("http://127.0.0.1:9/v1", {"a": "keyword:paris"})
        cfg["ensembles"]["e"].update(ens)
        with pytest.raises(UserError, match=re.escape(needle)) as err:
            await start_annotator(parse_config(cfg), port=0, probes=False)
        assert str(err.value).startswith("ensembles.e: ")


def test_a_judge_sampling_key_keeps_the_other_judge_default():
    """Raising a judge's max_tokens keeps temperature 0 (and the reverse); null asks for the server's."""
    from moaa.services.config import JudgeConfig
    assert JudgeConfig(name="a", model="m", sampling={"max_tokens": 100}).sampling.temperature == 0.0
    assert JudgeConfig(name="a", model="m", sampling={"temperature": 0.7}).sampling.max_tokens == 512
    assert JudgeConfig(name="a", model="m", sampling={"temperature": None}).sampling.temperature is None


async def test_an_answer_left_unrated_is_never_silently_dropped(judge_emulator, annotator_factory):
    """Every judge leaving the best answer unrated is too many abstentions (not a pair of the others); an
    aggregator judge leaving one out falls back to the judges' weighted mean, and says so."""
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"j1": "keyword:paris+skip=capital", "j2": "keyword:paris+skip=capital+name=2"},
        mode="pointwise", combine="mean", min_margin=0.5, max_abstain_fraction=0.5))
    resp = await stub.Annotate(request([BAD, GOOD, OK]))
    assert resp.skipped and resp.skip_reason.startswith(
        "too_many_abstentions: 2 of 2 judges gave no readable score for answer 'c1'"), resp.skip_reason
    stub = await annotator_factory(judge_config(
        judge_emulator.url, {"j1": "keyword:paris", "j2": "keyword:paris+name=2"},
        aggregator="keyword:paris+skip=capital", min_margin=0.5))
    resp = await stub.Annotate(request([BAD, GOOD, OK]))
    assert not resp.skipped and resp.chosen_id == "c1" and resp.combine == "weighted"
    assert "the aggregator judge gave no readable score for answer(s) 'c1': weighted mean used" in resp.note
