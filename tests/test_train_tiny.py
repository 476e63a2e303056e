"""Real TRL SFT and DPO steps on the tiny model (CPU): loss falls, outputs are complete, the model loads."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from moaa.cli.main import main
from moaa.trainer.plots import read_metrics
from tests.fixtures.trainer import FIXED_BATCH, sft_rows, write_jsonl

pytestmark = pytest.mark.slow


def losses(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out / "metrics.jsonl") if key in r]


def assert_loads_and_generates(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.chat_template, "the saved tokenizer keeps its chat template"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(gen[0, ids["input_ids"].shape[1]:])


def test_sft_tiny_loss_falls_and_outputs(tiny_sft_dir, tiny_model_dir, train_data, capsys):
    out = tiny_sft_dir
    # the model's config is the base's: nothing of training's (TRL's use_cache=False) leaks into it
    assert json.loads((out / "config.json").read_text()) == json.loads((tiny_model_dir / "config.json").read_text())
    assert not {"optimizer.pt", "scheduler.pt", "rng_state.pth"} & {p.name for p in out.iterdir()}
    ls = losses(out)
    assert len(ls) == 6 and all(math.isfinite(x) for x in ls)
    assert ls[-1] < ls[0] - 0.05, ls
    assert (out / "sft_curves.png").stat().st_size > 1000
    man = json.loads((out / "manifest.json").read_text())
    assert man["data"]["sha256"] and man["data"]["rows_kept"] == 4
    assert man["world_size"] == 1 and man["effective_global_batch_size"] == 4
    assert man["gradient_accumulation_steps"] == 1 and man["seed"] == 42
    assert {"torch", "transformers", "trl"} <= set(man["packages"]) and man["final_step"] == 6
    assert man["config"]["max_steps"] == 6 and man["trl_args"]["learning_rate"] == 1e-3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert_loads_and_generates(out)


def test_dpo_tiny_loss_falls_rewards_plotted(tiny_sft_dir, train_data, tmp_path, capsys):
    out = tmp_path / "dpo"
    rc = main(["train", "dpo", "--data", str(train_data["dpo"]), "--model", str(tiny_sft_dir), "--out", str(out),
               "--max-steps", "5", "--save-steps", "100", "--beta", "0.1", *FIXED_BATCH])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    logs = [x for x in lines if x["event"] == "log" and "loss" in x]
    assert logs and all({"step", "total", "loss", "eta_s", "steps_per_s"} <= set(x) for x in logs)
    assert logs[-1]["steps_per_s"] > 0
    assert logs[-1]["total"] == 5
    ls = losses(out)
    assert all(math.isfinite(x) for x in ls) and ls[-1] < ls[0], ls
    acc = losses(out, "rewards/accuracies")
    margins = losses(out, "rewards/margins")
    assert acc[-1] >= 0.75 and margins[-1] > margins[0]
    assert (out / "dpo_curves.png").stat().st_size > 1000
    man = json.loads((out / "manifest.json").read_text())
    assert man["trl_args"]["beta"] == 0.1 and man["trl_args"]["loss_type"] == ["sigmoid"]
    assert_loads_and_generates(out)


def test_sft_lora_merged(tiny_model_dir, train_data, tmp_path):
    out = tmp_path / "lora"
    rc = main(["train", "sft", "--data", str(train_data["sft"]), "--model", str(tiny_model_dir), "--out", str(out),
               "--max-steps", "3", "--save-steps", "100", "--lora", "--set", "lora.r=4", *FIXED_BATCH])
    assert rc == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert all(math.isfinite(x) for x in losses(out))
    assert_loads_and_generates(out)


def test_lora_adapter_loads_with_peft_from_anywhere(tiny_model_dir, train_data, tmp_path, monkeypatch):
    """Unmerged adapters in peft's format, naming a base a user can load from any folder: trained with --model
    given relative to the working directory, the adapter recorded that relative path."""
    from peft import AutoPeftModelForCausalLM

    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "base")
    monkeypatch.chdir(work)
    out = work / "lora"
    rc = main(["train", "sft", "--data", str(train_data["sft"]), "--model", "base", "--out", "lora", "--max-steps", "2",
               "--save-steps", "100", "--lora", "--set", "lora.merge=false", "--set", "lora.r=4", *FIXED_BATCH])
    assert rc == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(work / "base")
    assert json.loads((out / "manifest.json").read_text())["model_path"] == str(work / "base")
    monkeypatch.chdir(tmp_path)
    merged = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out).save_pretrained(tmp_path / "merged")
    assert_loads_and_generates(tmp_path / "merged")


def test_base_model_without_chat_template_gets_one(tiny_model_dir, train_data, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = base / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(base).chat_template
    out = tmp_path / "out"
    # the template moaa gives marks the answers, so TRL's assistant_only_loss works on it
    rc = main(["train", "sft", "--data", str(train_data["sft"]), "--model", str(base), "--out", str(out),
               "--max-steps", "2", "--save-steps", "100", "--set", "trl.assistant_only_loss=true", *FIXED_BATCH])
    assert rc == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["chat_template"].startswith("set to ChatML")
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    answer = [i for i, m in zip(ids["input_ids"], ids["assistant_masks"]) if m]
    assert tok.decode(answer) == "yo<|im_end|>"
    assert_loads_and_generates(out)


def test_model_folder_without_config_is_bad_input(train_data, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    rc = main(["train", "sft", "--data", str(train_data["sft"]), "--model", str(tmp_path / "m"),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    # the one resolver's line, as `moaa sample`, `moaa logprobs` and `moaa backend serve` say it
    assert rc == 2 and "has no config.json; give a Hugging Face model folder" in err and len(err.splitlines()) == 1


def _sft(data, model, out, *extra) -> int:
    return main(["train", "sft", "--data", str(data), "--model", str(model), "--out", str(out), "--max-steps", "2",
                 "--save-steps", "2", *FIXED_BATCH, *extra])


def test_eval_data_is_evaluated_and_recorded(tiny_model_dir, train_data, tmp_path):
    out = tmp_path / "eval"
    assert _sft(train_data["sft"], tiny_model_dir, out, "--eval-data", str(train_data["sft"])) == 0
    evals = losses(out, "eval_loss")
    assert len(evals) == 1 and math.isfinite(evals[0])  # once, at save_steps
    assert json.loads((out / "manifest.json").read_text())["eval_data"]["rows_kept"] == 4


def test_prompt_completion_rows_train_on_the_completion_only(tiny_model_dir, tmp_path):
    """TRL's conversational prompt-completion rows (here as a Parquet file, as the Hub ships them) train as TRL
    trains them: the loss falls, and the batch TRL builds from what moaa hands it (with moaa's TRL settings)
    masks every prompt token out of the labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from moaa.trainer.config import build_trl_args
    from moaa.trainer.data import load_rows, to_dataset
    from moaa.trainer.sft import SFTSettings

    rows = [{"id": f"c{r['id']}", "prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in sft_rows()]
    data = tmp_path / "pc.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    out = tmp_path / "o"
    assert _sft(data, tiny_model_dir, out, "--eval-data", str(data), "--max-steps", "4", "--save-steps", "4") == 0
    ls = losses(out)
    assert len(ls) == 4 and ls[-1] < ls[0] - 0.05, ls
    assert json.loads((out / "manifest.json").read_text())["data"]["format"] == "prompt-completion"

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = SFTSettings(data=str(data), model=str(tiny_model_dir), out=str(tmp_path / "x"), max_length=96)
    args = build_trl_args(cfg, device="cpu")
    kept, _ = load_rows(data, "sft")
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=to_dataset(kept, "sft"), processing_class=tok)
    labels = trainer.data_collator([trainer.train_dataset[0]])["labels"][0].tolist()
    prompt_ids = tok.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True, tokenize=True)
    prompt_ids = prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids
    n = len(prompt_ids)
    assert labels[:n] == [-100] * n and all(x != -100 for x in labels[n:]), (n, labels)


def test_same_seed_same_losses(tiny_model_dir, train_data, tmp_path):
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "a", "--seed", "3") == 0
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "b", "--seed", "3") == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_trl_refusing_the_template_is_bad_input(tiny_model_dir, train_data, tmp_path, capsys):
    # assistant_only_loss needs {% generation %} markers the tiny model's template lacks: TRL says so only once
    # model and data meet; that is still the user's setting, so exit 2 and one line
    rc = _sft(train_data["sft"], tiny_model_dir, tmp_path / "o", "--set", "trl.assistant_only_loss=true")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "TRL refuses the SFT run: The chat template" in err


def test_out_with_another_runs_checkpoints_is_refused(tiny_model_dir, train_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(train_data["sft"], tiny_model_dir, out) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert _sft(train_data["sft"], tiny_model_dir, out, "--lr", "5e-4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run with other settings (learning_rate 0.001 -> 0.0005)" in err
    other = write_jsonl(tmp_path / "other.jsonl", sft_rows(5))
    assert _sft(other, tiny_model_dir, out) == 2
    assert "the data file's content (sha256)" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # nothing touched
    # the same settings (a harmless one changed) on the finished run: nothing to do, no model loaded or saved
    assert _sft(train_data["sft"], tiny_model_dir, out, "--set", "startup_timeout_s=300") == 0
    assert "is saved (step 2): nothing to do" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert json.loads((out / "manifest.json").read_text())["resumed_from"] is None


def test_out_that_is_a_file_or_the_model_itself_is_bad_input(tiny_model_dir, train_data, tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "f") == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert _sft(train_data["sft"], tiny_model_dir, tiny_model_dir) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is the model folder itself" in err


def test_trl_model_loading_fields_are_applied_by_moaas_loader(tiny_model_dir):
    """moaa loads the model itself; TRL's model_init_kwargs would otherwise be ignored (TRL applies them only to a
    model name)."""
    from moaa.trainer.config import load_train_config
    from moaa.trainer.runner import load_model_and_tokenizer

    cfg = load_train_config("sft", None, ['trl.model_init_kwargs={"attn_implementation":"eager"}'],
                            model=str(tiny_model_dir), data="d", out="o")
    model, _, _ = load_model_and_tokenizer(cfg, "cpu")
    assert model.config._attn_implementation == "eager"
    cfg = load_train_config("sft", None, ['trl.model_init_kwargs={"attn_implementation":"sdpa"}'],
                            model=str(tiny_model_dir), data="d", out="o")
    assert load_model_and_tokenizer(cfg, "cpu")[0].config._attn_implementation == "sdpa"


@pytest.mark.parametrize("item,trl_key,value", [
    ("packing=true", "packing", True),
    ("padding_free=true", "padding_free", True),      # without packing: rows are length-checked by moaa
    ("gradient_checkpointing=true", "gradient_checkpointing", True),
    ("precision=bf16", "bf16", True),                 # documented: bf16 also trains on CPU
    ("trl.max_grad_norm=0.5", "max_grad_norm", 0.5),
])
def test_common_trl_settings_train(item, trl_key, value, tiny_model_dir, train_data, tmp_path):
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "o", "--set", item) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["trl_args"][trl_key] == value
    assert len(losses(tmp_path / "o")) == 2 and all(math.isfinite(x) for x in losses(tmp_path / "o"))


def test_train_loss_is_the_mean_over_every_step_whatever_logging_steps_is(tiny_model_dir, train_data, tmp_path):
    """logging_steps 3 over 7 steps: the run's mean must count steps 7 (after the last regular log), as the
    same run logged every step does; the summary line says the same as the manifest."""
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "every", "--seed", "3", "--max-steps", "7",
                "--set", "logging_steps=1") == 0
    assert _sft(train_data["sft"], tiny_model_dir, tmp_path / "third", "--seed", "3", "--max-steps", "7",
                "--set", "logging_steps=3") == 0
    every = losses(tmp_path / "every")
    assert len(every) == 7
    for run in ("every", "third"):
        man = json.loads((tmp_path / run / "manifest.json").read_text())
        assert man["train_loss"] == pytest.approx(sum(every) / 7, rel=1e-4), run
        assert losses(tmp_path / run, "train_loss") == [pytest.approx(man["train_loss"])]


def test_train_loss_counts_every_step_with_epoch_checkpoints(tiny_model_dir, train_data, tmp_path):
    """save_strategy epoch: a checkpoint at each epoch's end is logged with it, so a run resumed there still
    reports the mean over every step (logging_steps 5 leaves steps after the last log otherwise)."""
    def run(out, logging):
        return main(["train", "sft", "--data", str(train_data["sft"]), "--model", str(tiny_model_dir), "--out",
                     str(out), *FIXED_BATCH, "--seed", "3", "--set", "num_train_epochs=2", "--set",
                     "trl.save_strategy=epoch", "--set", f"logging_steps={logging}"])
    assert run(tmp_path / "every", 1) == 0 and run(tmp_path / "fifth", 5) == 0
    every = losses(tmp_path / "every")
    assert len(every) >= 2
    for name in ("every", "fifth"):
        man = json.loads((tmp_path / name / "manifest.json").read_text())
        assert man["train_loss"] == pytest.approx(sum(every) / len(every), rel=1e-4), name
