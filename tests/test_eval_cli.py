"""`moaa eval` against real judges on 127.0.0.1: the judge emulator as an OpenAI-compatible judge, and a
real annotator server over it. Both orders are asked, so a position-only judge yields 50%, not a win."""
import json

import pytest

from moaa.pipeline.eval.run import load_answers
from moaa.errors import UserError
from moaa.services.annotator.server import start_annotator
from moaa.services.config import parse_config
from tests.fixtures.annotator import judge_config
from tests.fixtures.cli import run_moaa as _cli


def _answers(tmp_path):
    qs = [f"Question number {i}?" for i in range(10)]
    # the model's answer is longer on 7 of 10 prompts
    model = [{"id": f"q{i}", "prompt": q, "answer": ("long answer " * 8 if i < 7 else "short")} for i, q in enumerate(qs)]
    base = [{"id": f"q{i}", "instruction": q, "output": ("short" if i < 7 else "long answer " * 8)} for i, q in enumerate(qs)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in model))
    b.write_text("".join(json.dumps(r) + "\n" for r in base))
    return a, b


async def test_eval_with_openai_compatible_judge(judge_emulator, tmp_path):
    a, b = _answers(tmp_path)
    rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--name", "sft",
                              "--baseline-name", "base", "--judge-url", judge_emulator.url, "--judge-model", "longest",
                              "--out", str(tmp_path / "ev"), "--bootstrap", "200", "--grade")
    assert rc == 0, err
    wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
    assert wr["win_rate"] == pytest.approx(70.0) and wr["n"] == 10 and wr["inconsistent"] == 0
    assert wr["win_rate_ci"][0] < 70 < wr["win_rate_ci"][1]
    # the judge only rewards length: with the length term set to zero the advantage shrinks
    assert wr["lc_win_rate"] < wr["win_rate"]
    # 70% on 10 prompts: the interval includes 50%, so the printed verdict is no difference, never a win
    assert out.startswith("sft vs base: no measurable difference") and "win rate 70.0% [" in out
    assert wr["conclusion"] == "no measurable difference" and wr["abstained"] == wr["failed"] == wr["missing"] == 0
    # the emulator does not answer the 1-10 grading prompt: counted as abstentions, never as scores
    assert "sft: mean grade None (0 graded, 10 abstained, 0 failed)" in out


async def test_eval_position_only_judge_gives_half(judge_emulator, tmp_path):
    a, b = _answers(tmp_path)
    rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--judge-url", judge_emulator.url,
                              "--judge-model", "first", "--out", str(tmp_path / "ev"), "--bootstrap", "200")
    assert rc == 0, err
    wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
    assert wr["win_rate"] == 50.0 and wr["inconsistent"] == 10


async def test_eval_with_annotator_ensemble(judge_emulator, tmp_path):
    cfg = judge_config(judge_emulator.url, {"j1": "longest", "j2": "longest"}, mode="pointwise", combine="mean",
                       min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    try:
        a, b = _answers(tmp_path)
        rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--annotator", server.address,
                                  "--out", str(tmp_path / "ev"), "--bootstrap", "200")
        assert rc == 0, err
        wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
        assert wr["win_rate"] == pytest.approx(70.0) and wr["n"] == 10
        # resumable: a second run judges nothing new and gives the same numbers
        rc, out2, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--annotator", server.address,
                                   "--out", str(tmp_path / "ev"), "--bootstrap", "200")
        assert rc == 0 and out2 == out
    finally:
        await server.stop(0)


async def test_eval_counts_missing_answers_and_agrees_with_its_verdict_rows(judge_emulator, tmp_path):
    """Prompts the model did not answer are counted, not silently dropped; winrates.json and the printed
    line are recomputed here from the stored verdict rows."""
    from moaa.jsonl import read_rows
    from moaa.pipeline.eval.winrate import conclusion, summarize

    a, b = _answers(tmp_path)
    a.write_text("".join(a.read_text().splitlines(keepends=True)[:8]))   # no answers for q8, q9
    rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--name", "sft", "--baseline-name",
                              "base", "--judge-url", judge_emulator.url, "--judge-model", "longest",
                              "--out", str(tmp_path / "ev"), "--bootstrap", "200")
    assert rc == 0, err
    wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
    rows = sorted((r for f in sorted((tmp_path / "ev" / "judgments").glob("data-*.jsonl")) for r in read_rows(f)),
                  key=lambda r: r["id"])   # the intervals resample rows in id order
    assert wr["n"] == len(rows) == 8 and wr["missing"] == 2 and wr["prompts"] == 8
    assert all(len(r["orders"]) == 2 for r in rows)            # both presentation orders asked and kept
    again = summarize("sft", "base", [r["preference"] for r in rows], [r["len_model"] for r in rows],
                      [r["len_baseline"] for r in rows], n_resamples=200).to_json()
    for key in ("win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "wins", "ties", "losses", "conclusion"):
        assert wr[key] == pytest.approx(again[key]) if key != "conclusion" else wr[key] == again[key], key
    from scipy.stats import binomtest
    won, lost = sum(r["preference"] > 0.5 for r in rows), sum(r["preference"] < 0.5 for r in rows)
    assert wr["sign_test_p"] == pytest.approx(binomtest(won, won + lost).pvalue)
    assert wr["conclusion"] == conclusion(wr["win_rate_ci"], 8, sign_p=wr["sign_test_p"])
    assert wr["empty"] == 0 and wr["fewer_judges"] == 0
    assert f"win rate {wr['win_rate']:.1f}% [{wr['win_rate_ci'][0]:.1f}, {wr['win_rate_ci'][1]:.1f}]" in out
    assert "2 missing" in out


async def test_eval_folder_refuses_another_judge_or_other_answers(judge_emulator, tmp_path):
    """The README's two `moaa eval` lines one after the other (same default --out): the second must not
    resume the first's verdicts, judged by another judge or of other answers; another comparison (--name)
    may share the folder."""
    a, b = _answers(tmp_path)
    ev = str(tmp_path / "ev")
    judge = ("--judge-url", judge_emulator.url, "--judge-model")
    rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), *judge, "longest", "--out", ev)
    assert rc == 0 and "win rate 70.0%" in out, err
    rc, _, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), *judge, "first", "--out", ev)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "holds model vs baseline judged by judge:longest, not judge:first" in err and "another --out" in err
    b.write_text(b.read_text().replace("short", "brief"))
    rc, _, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), *judge, "longest", "--out", ev)
    assert rc == 2 and "other answers of baseline" in err, err
    rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), *judge, "first", "--out", ev,
                              "--name", "again")
    assert rc == 0 and out.startswith("again vs baseline") and "win rate 50.0%" in out, err
    # the folder's winrates.json keeps both comparisons, not only the last one run
    both = json.loads((tmp_path / "ev" / "winrates.json").read_text())
    assert sorted((w["model"], w["win_rate"]) for w in both) == [("again", 50.0), ("model", 70.0)]


async def test_eval_bad_input_is_one_line(tmp_path):
    a, b = _answers(tmp_path)
    rc, _, err = await _cli("eval", "--answers", str(a), "--baseline", str(b))
    assert rc == 2 and err.strip().startswith("moaa: error: give exactly one judge") and len(err.strip().splitlines()) == 1
    rc, _, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--bootstrap", "99999999999")
    assert rc == 2 and "at most 100000 resamples" in err, err   # was a MemoryError after all the judging
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "prompt": "x"}\n')
    with pytest.raises(UserError, match="line 1: expected a prompt"):
        load_answers(tmp_path / "bad.jsonl")
    rc, _, err = await _cli("eval", "--answers", str(tmp_path / "bad.jsonl"), "--baseline", str(b),
                            "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "x")
    assert rc == 2 and "line 1" in err and len(err.strip().splitlines()) == 1
    # a second answer under one id (or to one prompt, rows without ids) would replace the first: an error
    dup = tmp_path / "dup.jsonl"
    dup.write_text(a.read_text() + json.dumps({"id": "q3", "prompt": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match="line 11: answer id 'q3' appears twice \\(first at line 4\\)"):
        load_answers(dup)
    dup.write_text('{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": "b"}\n')
    with pytest.raises(UserError, match="line 2: a second answer to the same prompt"):
        load_answers(dup)
    rc, _, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--out", str(a),
                            "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "x")
    assert rc == 2 and err.strip() == f"moaa: error: --out {a} is a file; give a folder (new, or one to resume)"


async def test_eval_all_abstentions_are_not_ties(judge_emulator, tmp_path):
    cfg = judge_config(judge_emulator.url, {"j1": "garbage"}, mode="pairwise", combine="mean", min_margin=0.0)
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    try:
        a, b = _answers(tmp_path)
        rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--annotator", server.address,
                                  "--out", str(tmp_path / "ev"))
        assert rc == 0, err
        assert "no verdict: none of the pairs was judged (10 abstained, 0 failed, 0 missing an answer)" in out
        wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())
        assert wr[0]["n"] == 0 and wr[0]["abstained"] == 10 and wr[0]["ties"] == 0 and wr[0]["win_rate"] is None
        skipped = (tmp_path / "ev" / "judgments" / "skipped.jsonl").read_text().splitlines()
        assert len(skipped) == 10 and all("judge_abstained" in s for s in skipped)
    finally:
        await server.stop(0)


async def test_a_grading_backend_failure_is_a_failure_not_an_abstention(judge_emulator, tmp_path):
    """A judge that cannot be reached while grading: each grade is recorded as failed (retried by a re-run),
    none is counted as an abstention, and the reachable judge's re-run grades them."""
    import socket

    from moaa.pipeline.eval.judges import ChatPairJudge
    from moaa.pipeline.eval.run import grade_answers
    from moaa.services.backend import BackendPool
    from moaa.services.config import BackendConfig

    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    answers = {"sft": load_answers(_answers(tmp_path)[0])}
    for url, expect in ((dead, {"mean": None, "n": 0, "abstained": 0, "failed": 10}),
                        (judge_emulator.url, {"mean": None, "n": 0, "abstained": 10, "failed": 0})):
        cfg = BackendConfig(urls=[url], served_model="longest", retries={"max_attempts": 1})
        async with BackendPool({"judge": cfg}, probes=False) as pool:
            assert (await grade_answers(ChatPairJudge(pool, "judge"), answers, tmp_path / "ev", quiet=True))["sft"] == expect


async def test_eval_counts_verdicts_given_without_a_judge(judge_emulator, tmp_path):
    """Verdicts nobody judged are counted beside n: pairs decided by an empty answer or of the same answer on
    both sides (the annotator refuses a pair of one text), and an ensemble's verdicts given without a judge whose
    backend failed (its min_judges let the other decide)."""
    cfg = judge_config(judge_emulator.url, {"j1": "longest", "down": "longest"}, mode="pointwise", combine="mean",
                       min_margin=0.0, min_judges=1)
    cfg["backends"]["m-down"].update(urls=["http://127.0.0.1:9/v1"], retries={"max_attempts": 1})
    server = await start_annotator(parse_config(cfg), port=0, probes=False)
    try:
        a, b = _answers(tmp_path)
        rows = [json.loads(line) for line in a.read_text().splitlines()]
        rows[0]["answer"] = rows[1]["answer"] = " "
        rows[8]["answer"] = "long answer " * 8 + " "   # the baseline's answer: a tie, no judge asked
        a.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rc, out, err = await _cli("eval", "--answers", str(a), "--baseline", str(b), "--annotator", server.address,
                                  "--out", str(tmp_path / "ev"), "--bootstrap", "200", "--quiet")
        assert rc == 0, err
        wr = json.loads((tmp_path / "ev" / "winrates.json").read_text())[0]
        assert wr["n"] == 10 and wr["empty"] == 2 and wr["same"] == 1 and wr["fewer_judges"] == 7
        assert "2 decided by an empty answer, not judged" in out
        assert "1 the same answer on both sides (a tie, not judged)" in out
        assert "7 decided without a judge whose backend failed" in out, out
    finally:
        await server.stop(0)
