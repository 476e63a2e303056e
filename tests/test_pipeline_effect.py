"""The judge-independent training-effect measures: log-probabilities on the tiny model checked against a
token-by-token computation in plain torch, the measures' arithmetic, the held-out splits, the CLI's errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from moaa.cli.main import main
from moaa.prompts import held_out_ids
from moaa.pipeline.effect import effect_items, training_effect
from tests.fixtures.trainer import FIXED_BATCH, pref_rows, sft_rows, write_jsonl

PROMPT = [{"role": "user", "content": "What is 2 plus 2?"}]
ANSWER = [{"role": "assistant", "content": "The answer is 4."}]


def _by_hand(model_dir, prompt, completion) -> tuple[float, int]:
    """Sum of log p(token | all tokens before it) over the answer's tokens, one forward pass per token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    p = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(prompt + completion, tokenize=False), add_special_tokens=False)["input_ids"]
    assert full[:len(p)] == p
    total = 0.0
    with torch.no_grad():
        for t in range(len(p), len(full)):
            logits = model(input_ids=torch.tensor([full[:t]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[full[t]])
    return total, len(full) - len(p)


def test_logprobs_match_a_token_by_token_computation(tiny_model_dir, tmp_path, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", [
        {"id": "a", "prompt": PROMPT, "completion": ANSWER},
        {"id": "b", "prompt": [{"role": "system", "content": "Be brief."}] + PROMPT,
         "completion": [{"role": "assistant", "content": "Four."}], "models": ["m"]},
        {"id": "c", "prompt": PROMPT, "completion": ANSWER, "models": ["other"]}])
    out = tmp_path / "lp.json"
    assert main(["logprobs", "--model", f"m={tiny_model_dir}", "--items", str(items), "--out", str(out)]) == 0
    got = json.loads(out.read_text())["m"]
    assert sorted(got) == ["a", "b"]     # row c names another model
    for rid, prompt, completion in (("a", PROMPT, ANSWER),
                                    ("b", [{"role": "system", "content": "Be brief."}] + PROMPT,
                                     [{"role": "assistant", "content": "Four."}])):
        want, n = _by_hand(tiny_model_dir, prompt, completion)
        assert got[rid][1] == n and n > 3
        assert got[rid][0] == pytest.approx(want, abs=1e-3)
        assert got[rid][0] < 0


def test_measures_from_log_probabilities_by_hand():
    # two held-out SFT rows: base NLL 30 + 10 over 20 tokens = 2.0; SFT 20 + 4 -> 1.2
    lp = {"base": {"sft:x": [-30.0, 15], "sft:y": [-10.0, 5]},
          "sft": {"sft:x": [-20.0, 15], "sft:y": [-4.0, 5],
                  "heldout:chosen:p": [-10.0, 4], "heldout:rejected:p": [-10.0, 4],
                  "heldout:chosen:q": [-8.0, 4], "heldout:rejected:q": [-9.0, 4],
                  "train:chosen:r": [-5.0, 2], "train:rejected:r": [-5.0, 2]},
          "dpo": {"heldout:chosen:p": [-9.0, 4], "heldout:rejected:p": [-11.0, 4],   # margin 0.1 * (1 + 1) = 0.2
                  "heldout:chosen:q": [-9.0, 4], "heldout:rejected:q": [-9.0, 4],    # 0.1 * (-1 - 0) = -0.1
                  "train:chosen:r": [-5.0, 2], "train:rejected:r": [-5.0, 2]}}        # 0: a tie counts half
    ans = {"base": {"1": (PROMPT, "a"), "2": (PROMPT, "b")}, "sft": {"1": (PROMPT, "a"), "2": (PROMPT, "B")},
           "dpo": {"1": (PROMPT, "a "), "2": (PROMPT, "B")}}
    e = training_effect(lp, ans, beta=0.1)
    loss = e["sft_heldout_loss"]
    assert loss["base"] == pytest.approx(2.0) and loss["sft"] == pytest.approx(1.2) and loss["tokens"] == 20
    acc, margin = e["dpo_reward_accuracy"], e["dpo_reward_margin"]
    assert acc["heldout"]["n"] == 2 and acc["heldout"]["dpo"] == pytest.approx(0.5) and acc["heldout"]["sft"] == 0.5
    assert margin["heldout"]["dpo"] == pytest.approx(0.05)
    lo, hi = acc["heldout"]["dpo_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert acc["train"]["dpo"] == pytest.approx(0.5) and "0.5 by definition" in acc["note"]
    assert e["answers_changed"]["sft_vs_base"] == {"n": 2, "changed": 1, "share": 0.5}
    assert e["answers_changed"]["dpo_vs_sft"]["changed"] == 0     # whitespace alone is no change
    text = " ".join(e["statements"])
    assert "SFT lowered the per-token loss" in text
    assert "DPO changed nothing a user would see" in text and "too few held-out pairs" in text
    assert "on its 1 training pairs 50%" in text


@pytest.mark.parametrize("won,lost,needle", [
    (6, 1, "the interval excludes 0.5 but the sign test gives p = 0.12: too few pairs to tell DPO from no change"),
    (7, 0, "above 0.5"),
])
def test_held_out_reward_accuracy_needs_the_sign_test_too(won, lost, needle):
    """6 of 7 held-out pairs ranked right: the bootstrap interval lies above 0.5, the sign test (p = 0.125)
    does not support it, so the report claims no change; 7 of 7 (p = 0.016) it does."""
    lp: dict = {"sft": {}, "dpo": {}}
    for k in range(won + lost):
        for side in ("chosen", "rejected"):
            lp["sft"][f"heldout:{side}:p{k}"] = [-10.0, 4]
            good = (side == "chosen") == (k < won)
            lp["dpo"][f"heldout:{side}:p{k}"] = [-9.0 if good else -11.0, 4]
    e = training_effect(lp, {}, beta=0.1)
    held = e["dpo_reward_accuracy"]["heldout"]
    assert held["n"] == won + lost and held["dpo_ci"][0] > 0.5
    assert needle in " ".join(e["statements"])


def test_sampled_answers_show_a_change_the_greedy_ones_hide():
    greedy = {m: {"1": (PROMPT, "same")} for m in ("base", "sft", "dpo")}
    sampled = {"base": {"1#0": (PROMPT, "x"), "1#1": (PROMPT, "y")}, "sft": {"1#0": (PROMPT, "x"), "1#1": (PROMPT, "y")},
               "dpo": {"1#0": (PROMPT, "x"), "1#1": (PROMPT, "z")}}
    e = training_effect({}, greedy, 0.1, sampled)
    assert e["answers_changed"]["sampled"]["dpo_vs_sft"] == {"n": 2, "changed": 1, "share": 0.5}
    text = " ".join(e["statements"])
    assert "DPO left every greedy answer as the SFT model's (1 eval prompts), but changed 1 of 2 sampled" in text
    assert "SFT changed nothing a user would see: its greedy answers equal the base model's on all 1 eval prompts, " \
           "and all 2 sampled answers too." in text


def test_missing_parts_are_said_not_invented(tmp_path):
    e = training_effect({}, {}, beta=0.1)
    assert e["sft_heldout_loss"] == {"note": "no held-out stage-1 answers"}
    assert e["dpo_reward_accuracy"]["heldout"] == {"n": 0} and e["statements"] == []
    assert effect_items(tmp_path / "none.jsonl", {"heldout": tmp_path / "none.jsonl"}) == []


def test_items_cover_sft_rows_and_both_sides_of_pairs(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", sft_rows(2))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(3))
    items = effect_items(sft, {"heldout": pairs})
    assert [i["id"] for i in items[:2]] == ["sft:s0", "sft:s1"] and items[0]["models"] == ["base", "sft"]
    assert items[0]["prompt"][-1]["role"] == "user" and items[0]["completion"][0]["role"] == "assistant"
    assert [i["id"] for i in items[2:4]] == ["heldout:chosen:p0", "heldout:rejected:p0"] and len(items) == 8


def test_held_out_ids_are_a_stable_share():
    ids = [f"id{i}" for i in range(30)]
    held = held_out_ids(ids, 0.2, "pairs-heldout")
    assert len(held) == 6 and held == held_out_ids(list(reversed(ids)), 0.2, "pairs-heldout")
    assert held != held_out_ids(ids, 0.2, "eval")          # another salt, another share
    assert held_out_ids(ids[:3], 0.5, "x") == set()
    assert len(held_out_ids(ids, 0.2, "pairs-heldout", cap=4)) == 4 and held_out_ids(ids, 0.2, "pairs-heldout", cap=4) <= held


@pytest.mark.parametrize("args, needle", [
    (["--model", "nofolder"], "use NAME=MODEL"),
    (["--model", "m=/nonexistent/model"], "not a packaged model"),
])
def test_logprobs_cli_errors_are_one_line(tmp_path, args, needle):
    items = write_jsonl(tmp_path / "items.jsonl", [{"id": "a", "prompt": PROMPT, "completion": ANSWER}])
    proc = subprocess.run([sys.executable, "-m", "moaa.cli.main", "logprobs", *args, "--items", str(items),
                           "--out", str(tmp_path / "o.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_logprobs_cli_names_a_bad_items_line(tmp_path, tiny_model_dir):
    items = write_jsonl(tmp_path / "items.jsonl", [{"id": "a", "prompt": PROMPT, "completion": ANSWER},
                                                   {"id": "b", "prompt": "text"}])
    proc = subprocess.run([sys.executable, "-m", "moaa.cli.main", "logprobs", "--model", f"m={tiny_model_dir}",
                           "--items", str(items), "--out", str(tmp_path / "o.json")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "line 2" in proc.stderr and not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_dpo_on_the_tiny_model_moves_its_implicit_reward(tiny_sft_dir, train_data, tmp_path):
    """After a few DPO steps on 4 pairs, the DPO model (reference: the SFT model) prefers chosen on them."""
    out = tmp_path / "dpo"
    assert main(["train", "dpo", "--data", str(train_data["dpo"]), "--model", str(tiny_sft_dir), "--out", str(out),
                 "--max-steps", "5", "--save-steps", "100", "--beta", "0.1", *FIXED_BATCH]) == 0
    items = effect_items(tmp_path / "none.jsonl", {"train": train_data["dpo"]})
    write_jsonl(tmp_path / "items.jsonl", items)
    assert main(["logprobs", "--model", f"sft={tiny_sft_dir}", "--model", f"dpo={out}", "--items",
                 str(tmp_path / "items.jsonl"), "--out", str(tmp_path / "lp.json")]) == 0
    e = training_effect(json.loads((tmp_path / "lp.json").read_text()), {}, beta=0.1)
    train = e["dpo_reward_accuracy"]["train"]
    assert train["n"] == 4 and train["dpo"] > 0.5 and train["sft"] == 0.5
    assert e["dpo_reward_margin"]["train"]["dpo"] > 0 and math.isfinite(e["dpo_reward_margin"]["train"]["dpo"])


@pytest.mark.slow
async def test_effect_step_on_a_run_folder_and_its_rerun_recomputes_nothing(tiny_model_dir, tiny_sft_dir, tmp_path):
    """The step itself: a DPO model equal to the SFT model changed nothing, and the report says so."""
    import shutil

    from moaa.pipeline.budget import TokenLedger
    from moaa.pipeline.layout import RunLayout
    from moaa.pipeline.stages import StageContext, stage_training_effect

    lay = RunLayout(tmp_path / "run")
    for folder in (lay.sft_data, lay.pairs, lay.eval):
        folder.mkdir(parents=True)
    write_jsonl(lay.sft_data / "heldout.jsonl", sft_rows(2))
    write_jsonl(lay.pairs / "heldout.jsonl", pref_rows(2))
    write_jsonl(lay.pairs / "train.jsonl", pref_rows(3))
    shutil.copytree(tiny_sft_dir, lay.sft_model)
    shutil.copytree(tiny_sft_dir, lay.dpo_model)
    for name, text in (("base", "x"), ("sft", "y"), ("dpo", "y")):
        write_jsonl(lay.eval / f"answers-{name}.jsonl", [{"id": "q", "prompt": PROMPT, "candidates": [{"text": text}]}])
    ctx = StageContext(layout=lay, ledger=TokenLedger(lay.usage), config_hash="h", base_model=str(tiny_model_dir),
                       settings={"sft": {"max_length": 128}, "dpo": {"beta": 0.1}},
                       quiet=True)
    effect = await stage_training_effect(ctx)
    assert effect["sft_heldout_loss"]["rows"] == 2 and effect["sft_heldout_loss"]["sft"] < effect["sft_heldout_loss"]["base"]
    assert effect["dpo_reward_accuracy"]["heldout"]["dpo"] == 0.5 and effect["dpo_reward_margin"]["train"]["dpo"] == 0.0
    assert effect["answers_changed"]["sft_vs_base"]["changed"] == 1
    assert any(s.startswith("DPO changed nothing a user would see") for s in effect["statements"])
    assert json.loads((lay.eval / "effect.json").read_text()) == effect
    stamp = (lay.eval / "logprobs.json").stat().st_mtime_ns
    shutil.rmtree(lay.dpo_model)          # a re-run does not load a model again
    assert await stage_training_effect(ctx) == effect
    assert (lay.eval / "logprobs.json").stat().st_mtime_ns == stamp
