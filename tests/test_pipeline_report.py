"""Report generation from a synthetic run folder (no models: the report reads files only)."""
import json

import pytest

from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.pipeline.report import JudgeTally, build_report, judge_agreement
from moaa.files import atomic_write_json
from moaa.pipeline.store import DatasetStore


def _synthetic_run(root):
    lay = RunLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(lay.run_manifest, {"config_hash": "c0ffee", "started_at": "t0", "updated_at": "t1",
                                         "stages": {"sft_data": {"status": "done", "seconds": 12.0}}})
    st = DatasetStore(lay.sft_data, stage="sft_data", fmt="sft").open()
    for i in range(5):
        st.write({"id": f"p{i}", "messages": []}, models=["agg"])
    st.write_manifest(complete=True)
    pairs = DatasetStore(lay.pairs, stage="pairs", fmt="preference").open()
    for i in range(6):
        s = [float((i + k) % 10 + 1) for k in range(5)]
        cids = [f"c{k}" for k in range(5)]
        judges = [{"judge": name, "scores": dict(zip(cids, sc))}
                  for name, sc in (("judge-a", s), ("judge-b", s[::-1]), ("judge-c", s))]
        pairs.write({"id": f"p{i}", "prompt": [], "chosen": [], "rejected": [],
                     "annotation": {"candidates": cids, "judges": judges}})
    pairs.skip("p9", "low_margin: 0.2 < 0.5")
    pairs.write_manifest(complete=True)
    for name, losses in (("sft-model", [2.0, 1.5, 1.1]), ("dpo-model", [0.69, 0.6, 0.5])):
        d = root / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": l}) + "\n"
                                                 for i, l in enumerate(losses)) + '{"event": "end"}\n')
    led = TokenLedger(lay.usage, budget=None)
    led.add("sft_data", "smol-a", {"prompt_tokens": 100, "completion_tokens": 50})
    led.save()
    lay.eval.mkdir()
    atomic_write_json(lay.eval / "winrates.json", [
        {"model": "sft", "baseline": "base", "n": 10, "win_rate": 60.0, "win_rate_ci": [40.0, 80.0],
         "lc_win_rate": 55.0, "lc_win_rate_ci": [35.0, 75.0], "wins": 6, "ties": 0, "losses": 4, "inconsistent": 1,
         "prompts": 10, "conclusion": "no measurable difference", "lc_conclusion": "no measurable difference",
         "abstained": 2, "failed": 0, "missing": 0}])
    atomic_write_json(lay.eval / "grades.json", {"base": {"mean": 4.5, "n": 10, "abstained": 0}})
    return lay


def assert_tables_rectangular(text: str) -> None:
    """Valid Markdown tables: a separator under each header and as many cells in every row as in the header."""
    block: list[str] = []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            widths = {row.count("|") for row in block}
            assert len(widths) == 1 and set(block[1].replace("|", "")) <= set("-"), block
        block = []


@pytest.fixture
def plot_labels(monkeypatch):
    """(title, x label, y label) of every axis the report saves; each plot must label both axes."""
    import matplotlib.figure

    labels, save = [], matplotlib.figure.Figure.savefig

    def record(fig, *a, **kw):
        labels.extend((ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes
                      if ax.get_label() != "<colorbar>")
        return save(fig, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    yield labels
    assert all(x and y for _, x, y in labels), labels


def test_report_from_synthetic_run(tmp_path, plot_labels):
    lay = _synthetic_run(tmp_path / "run")
    md = build_report(lay.root)
    text = md.read_text()
    for png in ("losses.png", "judge_scores.png", "judge_agreement.png", "winrates.png"):
        assert (lay.report / png).stat().st_size > 1000, png
        assert f"({png})" in text
    assert "SFT: loss 2.0000 -> 1.1000 over 3 steps" in text
    assert "| stage 1: MoA SFT data | 5 | 0 | 0 | yes | agg |" in text
    assert "low_margin: 1" in text
    assert ("| sft | base | 10 | 10 | 60.0 [40.0, 80.0] | 55.0 [35.0, 75.0] | no measurable difference | "
            "no measurable difference | 6/0/4 | 1 | 2 | 0 | 0 |") in text
    assert "| sft_data | smol-a | 100 | 50 | 1 |" in text
    assert "| base | 4.50 | 10 | 0 | 0 |" in text
    assert len(plot_labels) == 5   # losses (SFT, DPO), judge scores, judge agreement, win rates: each labelled
    assert_tables_rectangular(text)


def test_report_of_an_empty_run_folder(tmp_path):
    text = build_report(tmp_path).read_text()
    assert text.startswith("# moaa pipeline report")


def test_judge_agreement_matrix():
    tally = JudgeTally()
    tally.add({"a": [1, 2, 3], "b": [3, 2, 1], "c": [1, 2, 3], "d": [5, 5, 5]})
    tally.add({"a": [1, 2, 3], "c": [3, 2, 1]})   # b and d did not judge this prompt: only a-c counts it
    names, mat = judge_agreement(tally)
    i = {n: k for k, n in enumerate(names)}
    assert mat[i["a"], i["c"]] == 0.0 and mat[i["a"], i["b"]] == -1.0 and mat[i["b"], i["c"]] == -1.0
    assert str(mat[i["a"], i["d"]]) == "nan"   # constant scores: tau undefined, not 0


def test_report_shows_the_training_effect_and_why_prompts_gave_no_pair(tmp_path, plot_labels):
    from moaa.pipeline.effect import training_effect

    lay = _synthetic_run(tmp_path / "run")
    lp = {"base": {"sft:x": [-30.0, 15]}, "sft": {"sft:x": [-15.0, 15], "heldout:chosen:p": [-9.0, 3],
                                                  "heldout:rejected:p": [-9.0, 3]},
          "dpo": {"heldout:chosen:p": [-8.0, 3], "heldout:rejected:p": [-9.5, 3]}}
    same = {"1": ([], "same")}
    atomic_write_json(lay.eval / "effect.json", training_effect(lp, {"base": same, "sft": same, "dpo": same}, 0.1))
    text = build_report(lay.root).read_text()
    assert "## Did training change the model?" in text and (lay.report / "training_effect.png").stat().st_size > 1000
    assert "base 2.0000, SFT 1.0000 (-1.0000)" in text
    assert "| heldout | 1 | 0.50 | 1.00 [1.00, 1.00] | 0.1500 [0.1500, 0.1500] |" in text
    assert "SFT changed nothing a user would see" in text and "DPO changed nothing a user would see" in text
    assert "| low_margin | 1 | low_margin: 0.2 < 0.5 |" in text
    assert "too few held-out pairs for an interval to mean much" in text


def _judged_run(root, url):
    """A run folder whose eval stage was judged for real: the judge emulator (policy keyword:WIN prefers the
    answer containing WIN; garbage never answers readably) through moaa's chat judge, as stage_eval does."""
    from moaa.pipeline.eval.judges import ChatPairJudge
    from moaa.pipeline.eval.run import judge_pairs
    from moaa.services.backend import BackendPool
    from moaa.services.config import BackendConfig

    lay = RunLayout(root)
    prompt = lambda i: [{"role": "user", "content": f"Question {i}?"}]  # noqa: E731
    # sft wins 11 of 12 prompts; dpo has no answer for q11
    answers = {"sft": {f"q{i}": (prompt(i), "WIN here" if i else "plain") for i in range(12)},
               "base": {f"q{i}": (prompt(i), "plain" if i else "WIN there") for i in range(12)},
               "dpo": {f"q{i}": (prompt(i), "WIN too") for i in range(11)}}

    async def judge_all():
        results = {}
        for policy, (model, baseline) in (("keyword:WIN", ("sft", "base")), ("garbage", ("dpo", "base"))):
            pool = BackendPool({"judge": BackendConfig(urls=[url], served_model=policy)}, probes=False)
            await pool.start()
            try:
                store = DatasetStore(lay.eval / "judgments", stage="eval", fmt="generations").open()
                results[(model, baseline)] = await judge_pairs(ChatPairJudge(pool, "judge"), model, baseline,
                                                               answers[model], answers[baseline], store, quiet=True)
            finally:
                await pool.close()
        return results

    return lay, answers, judge_all


async def test_report_summary_and_verdict_rows_agree_and_a_rerun_is_identical(judge_emulator, tmp_path, plot_labels):
    from moaa.jsonl import read_rows
    from moaa.pipeline.eval.run import winrates_from_store, write_winrates
    from moaa.pipeline.eval.winrate import summarize
    from moaa.pipeline.runner import format_summary
    from moaa.pipeline.stages import EVAL_PAIRS

    lay, answers, judge_all = _judged_run(tmp_path / "run", judge_emulator.url)
    lay.eval.mkdir(parents=True)
    missing = await judge_all()
    store = DatasetStore(lay.eval / "judgments", stage="eval", fmt="generations").open()
    store.write_manifest(complete=True)   # as stage_eval's _finish_dataset does
    winrates = winrates_from_store(store, EVAL_PAIRS, missing=missing, n_resamples=300)
    write_winrates(lay.eval, winrates)
    stages = {n: {"status": "done", "seconds": 1.0} for n in
              ("sft_data", "sft", "samples", "pairs", "dpo", "answers", "training_effect")}
    stages["eval"] = {"status": "done", "seconds": 1.0, "result": {"winrates": winrates}}
    atomic_write_json(lay.run_manifest, {"config_hash": "c0ffee", "stages": stages})
    summary = {"run_folder": str(lay.root), "eval": stages["eval"]["result"]}
    atomic_write_json(lay.root / "summary.json", summary)

    text = build_report(lay.root).read_text()
    assert [t for t, _, _ in plot_labels] == ["pairwise win rates"]

    by_pair = {(w["model"], w["baseline"]): w for w in winrates}
    assert set(by_pair) == {("sft", "base"), ("dpo", "base")}        # dpo vs sft: no answers in common judged
    rows = [r for f in sorted((lay.eval / "judgments").glob("data-*.jsonl")) for r in read_rows(f)]
    sft = sorted((r for r in rows if r["model"] == "sft"), key=lambda r: r["id"])   # resampled in id order
    again = summarize("sft", "base", [r["preference"] for r in sft], [r["len_model"] for r in sft],
                      [r["len_baseline"] for r in sft], n_resamples=300).to_json()
    w = by_pair[("sft", "base")]
    assert w["n"] == 12 and w["win_rate"] == again["win_rate"] == pytest.approx(100 * 11 / 12)
    assert w["win_rate_ci"] == again["win_rate_ci"] and w["wins"] == 11 and w["losses"] == 1
    assert w["conclusion"] == again["conclusion"] == "better"
    d = by_pair[("dpo", "base")]
    assert d["n"] == 0 and d["abstained"] == 11 and d["missing"] == 1 and d["ties"] == 0
    assert d["conclusion"].startswith("no verdict")
    # the same numbers in report.md, summary.json and the printed summary
    cell = f"{w['win_rate']:.1f} [{w['win_rate_ci'][0]:.1f}, {w['win_rate_ci'][1]:.1f}]"
    assert f"| sft | base | 12 | 12 | {cell} |" in text and "| better |" in text and "| 11/0/1 | 0 | 0 | 0 | 0 |" in text
    assert "| dpo | base | 0 | 0 | - | - | no verdict: none of the pairs was judged (11 abstained, 0 failed, 1 missing " \
           "an answer) | - | 0/0/0 | 0 | 11 | 0 | 1 |" in text
    assert "| eval: pairwise judgments | 12 | 11 (judge_abstained: 11) | 0 |" in text
    printed = format_summary(json.loads((lay.root / "summary.json").read_text()))
    assert f"sft vs base: better (win rate {w['win_rate']:.1f}% [{w['win_rate_ci'][0]:.1f}, " in printed
    assert "dpo vs base: no verdict" in printed and "11 abstained" in printed and "1 missing" in printed
    # Markdown: every image it references exists; a rerun writes the same report
    import re
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert_tables_rectangular(text)
    assert images and all((lay.report / i).is_file() for i in images)
    before = {p.name: p.read_bytes() for p in lay.report.iterdir()}
    assert build_report(lay.root).read_text() == text
    assert {p.name: p.read_bytes() for p in lay.report.iterdir()} == before


def test_report_of_an_interrupted_run_says_what_is_missing(tmp_path):
    lay = _synthetic_run(tmp_path / "run")
    atomic_write_json(lay.run_manifest, {"config_hash": "c0ffee", "stages": {
        "sft_data": {"status": "done", "seconds": 12.0},
        "sft": {"status": "failed", "seconds": 3.0, "error": "training crashed\nTraceback..."}}})
    text = build_report(lay.root).read_text()
    assert "| sft | failed: training crashed | 3 |" in text and "| eval | not run | 0 |" in text
    assert "**Incomplete run**: not done: sft, samples, pairs, dpo, answers, training_effect, eval." in text
    assert_tables_rectangular(text)


def test_report_says_why_there_are_no_win_rates(tmp_path):
    atomic_write_json(RunLayout(tmp_path).run_manifest, {"stages": {"eval": {"status": "done",
                                                                             "result": {"note": "no eval prompts"}}}})
    assert "No win rates: no eval prompts." in build_report(tmp_path).read_text()
    from moaa.pipeline.runner import format_summary

    assert "  eval: no eval prompts" in format_summary({"run_folder": str(tmp_path), "eval": {"note": "no eval prompts"}})


def test_report_command_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    from moaa.cli.main import main

    assert main(["pipeline", "report", str(tmp_path)]) == 2
    assert "is not a run folder (no run.json)" in capsys.readouterr().err and not (tmp_path / "report").exists()


def test_the_summary_says_nothing_of_a_stage_not_reached(tmp_path):
    """--until sft_data: no "stage 2: 0 preference pairs" line for a stage that did not run."""
    from moaa.pipeline.runner import format_summary

    text = format_summary({"run_folder": str(tmp_path), "sft_data": {"rows": 3, "skipped": 0}})
    assert "stage 1: 3 SFT rows written" in text and "stage 2" not in text
