"""Report generation from a synthetic run folder (no models: the report reads files only)."""
import json

from moaa.pipeline.budget import TokenLedger
from moaa.pipeline.layout import RunLayout
from moaa.pipeline.report import JudgeTally, build_report, judge_agreement
from moaa.pipeline.store import DatasetStore, atomic_write_json


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
         "lc_win_rate": 55.0, "lc_win_rate_ci": [35.0, 75.0], "wins": 6, "ties": 0, "losses": 4, "inconsistent": 1}])
    atomic_write_json(lay.eval / "grades.json", {"base": {"mean": 4.5, "n": 10, "abstained": 0}})
    return lay


def test_report_from_synthetic_run(tmp_path):
    lay = _synthetic_run(tmp_path / "run")
    md = build_report(lay.root)
    text = md.read_text()
    for png in ("losses.png", "judge_scores.png", "judge_agreement.png", "winrates.png"):
        assert (lay.report / png).stat().st_size > 1000, png
        assert f"({png})" in text
    assert "SFT: loss 2.0000 -> 1.1000 over 3 steps" in text
    assert "| stage 1: MoA SFT data | 5 | 0 | 0 | yes | agg |" in text
    assert "low_margin: 1" in text
    assert "| sft | base | 10 | 60.0 [40.0, 80.0] | 55.0 [35.0, 75.0] | 6/0/4 | 1 |" in text
    assert "| sft_data | smol-a | 100 | 50 | 1 |" in text
    assert "| base | 4.50 | 10 | 0 |" in text


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


def test_report_shows_the_training_effect_and_why_prompts_gave_no_pair(tmp_path):
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
