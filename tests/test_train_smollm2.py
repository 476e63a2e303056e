"""SFT then DPO on the real SmolLM2-135M-Instruct, on CPU: a few steps on a fixed small batch.

Kept short for the suite's budget (2 rows, max_length 64, 3 SFT and 2 DPO steps, no checkpoints); the loss must be finite and fall,
and the saved model must load and answer.
"""
from __future__ import annotations

import json
import math

import pytest

from moaa.cli.main import main
from moaa.trainer.plots import read_metrics
from tests.fixtures.models import SMOLLM2
from tests.fixtures.trainer import pref_rows, sft_rows, write_jsonl
from tests.test_train_tiny import assert_loads_and_generates

pytestmark = pytest.mark.slow

SMALL = ["--batch-size", "2", "--per-device-batch-size", "2", "--max-length", "64", "--schedule", "constant",
         "--set", "warmup_steps=0", "--set", "trl.save_strategy=no"]  # no 1.5 GB checkpoint at the end


def _losses(out, key="loss"):
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def smollm2_sft(smollm2_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("smol-sft")
    data = write_jsonl(d / "sft.jsonl", sft_rows(2))
    out = d / "out"
    # by its packaged name, as README's training example gives it (smollm2_model: prepared in the cache)
    rc = main(["train", "sft", "--data", str(data), "--model", SMOLLM2, "--out", str(out),
               "--max-steps", "3", "--lr", "1e-4", *SMALL])
    assert rc == 0
    return out


def test_sft_smollm2_loss_falls_and_model_answers(smollm2_sft, smollm2_model):
    ls = _losses(smollm2_sft)
    assert len(ls) == 3 and all(math.isfinite(x) for x in ls)
    assert ls[-1] < ls[0], ls
    man = json.loads((smollm2_sft / "manifest.json").read_text())
    assert man["chat_template"] == "model's own" and man["effective_global_batch_size"] == 2
    assert man["model"] == SMOLLM2 and man["model_path"] == str(smollm2_model)
    assert assert_loads_and_generates(smollm2_sft).strip()


def test_dpo_smollm2_on_the_sft_model(smollm2_sft, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_rows(2))
    out = tmp_path / "dpo"
    rc = main(["train", "dpo", "--data", str(data), "--model", str(smollm2_sft), "--out", str(out),
               "--max-steps", "2", "--lr", "2e-5", "--beta", "0.1", *SMALL])
    assert rc == 0
    ls = _losses(out)
    assert len(ls) == 2 and all(math.isfinite(x) for x in ls)
    assert ls[0] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at step 1
    assert ls[-1] < ls[0], ls
    assert _losses(out, "rewards/margins")[-1] > 0
    assert (out / "dpo_curves.png").is_file()
    assert assert_loads_and_generates(out).strip()
