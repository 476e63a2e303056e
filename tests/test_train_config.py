"""Train config: YAML + overrides, checked against the installed TRL before anything starts."""
from __future__ import annotations

import pytest

from moaa.cli.main import main
from moaa.errors import UserError
from moaa.trainer.config import build_trl_args, grad_accumulation, load_train_config

BASE = {"model": "m", "data": "d.jsonl", "out": "o"}


def test_yaml_then_flags_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nmax_steps: 50\nlora: {enabled: true, r: 4}\nbeta: 0.2\n")
    cfg = load_train_config("dpo", str(path), ["lora.r=8", "trl.max_grad_norm=0.5", "trl.save_strategy=no",
                                               'loss_type=["sigmoid","sft"]', "lora.target_modules=q_proj"],
                            max_steps=7, **BASE)
    assert cfg.trl["save_strategy"] == "no" and cfg.loss_type == ["sigmoid", "sft"]
    assert cfg.lora.target_modules == "q_proj"
    assert (cfg.learning_rate, cfg.max_steps, cfg.lora.r, cfg.lora.enabled, cfg.beta) == (1e-4, 7, 8, True, 0.2)
    args = build_trl_args(cfg, device="cpu")
    assert args.max_grad_norm == 0.5 and args.beta == 0.2 and args.use_cpu and not args.bf16


def test_removed_trl_field_is_named(tmp_path):
    # the alignment-handbook zephyr DPO recipe still sets max_prompt_length; this TRL has no such field
    path = tmp_path / "zephyr.yaml"
    path.write_text("beta: 0.01\nmax_prompt_length: 512\n")
    with pytest.raises(UserError, match=r"max_prompt_length is not a moaa DPOSettings field nor a field of the installed trl"):
        load_train_config("dpo", str(path), **BASE)
    with pytest.raises(UserError, match=r"max_prompt_length: not a field of the installed trl .* DPOConfig"):
        load_train_config("dpo", None, ["trl.max_prompt_length=512"], **BASE)


def test_trl_field_at_top_level_points_to_trl_section():
    with pytest.raises(UserError, match=r"max_grad_norm is a TRL field: put it under `trl:`"):
        load_train_config("sft", None, ["max_grad_norm=0.5"], **BASE)


def test_unknown_dpo_loss_type():
    with pytest.raises(UserError, match="loss_type bogus is not one the installed trl .* knows: sigmoid"):
        load_train_config("dpo", None, loss_type=["bogus"], **BASE)


def test_trl_refusal_is_a_user_error():
    with pytest.raises(UserError, match="SFTConfig refuses the config"):
        load_train_config("sft", None, ["lr_scheduler_type=nonsense"], **BASE)


@pytest.mark.parametrize("world,accum", [(1, 16), (2, 8), (4, 4), (8, 2)])
def test_global_batch_is_kept_across_gpu_counts(world, accum):
    cfg = load_train_config("sft", None, global_batch_size=32, per_device_batch_size=2, **BASE)
    assert grad_accumulation(cfg, world) == accum
    assert accum * world * cfg.per_device_batch_size == 32


def test_world_size_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="not a multiple of per_device_batch_size 1 x world size 3"):
        load_train_config("sft", None, global_batch_size=16, **BASE)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_train_config("sft", str(bad), **BASE)
    with pytest.raises(UserError, match="does not exist"):
        load_train_config("sft", str(tmp_path / "nope.yaml"), **BASE)
    with pytest.raises(UserError, match="cannot read config file .*: Is a directory"):
        load_train_config("sft", str(tmp_path), **BASE)


def test_cli_bad_config_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "zephyr.yaml"
    path.write_text("max_prompt_length: 512\n")
    rc = main(["train", "dpo", "--config", str(path), "--data", "d", "--model", "m", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "max_prompt_length" in err
    assert not (tmp_path / "o").exists()  # nothing started


def test_startup_steps_are_bounded():
    import time

    from moaa.errors import TransientError
    from moaa.trainer.runner import bounded

    with pytest.raises(TransientError, match="loading model m did not finish within 0s"):
        bounded(lambda: time.sleep(5), 0.2, "loading model m")
    with pytest.raises(ValueError, match="boom"):
        bounded(lambda: (_ for _ in ()).throw(ValueError("boom")), 5, "x")
    assert bounded(lambda: 3, 5, "x") == 3


def test_metrics_keep_the_last_value_per_step_and_plot(tmp_path):
    from moaa.trainer.plots import plot_metrics, read_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "loss": 1.4, "rewards/margins": 0.1},
            {"step": 3, "loss": "nan"}]  # step 2 re-done after a resume; a NaN loss stays visible as text
    path.write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    got = read_metrics(path)
    assert [r["step"] for r in got] == [1, 2, 3] and got[1]["loss"] == 1.4
    png = plot_metrics(path, tmp_path / "c.png", "dpo")
    assert png.stat().st_size > 1000
    assert plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png", "sft") is None


def test_pipeline_set_reaches_trl_as_a_string(tmp_path):
    """`moaa pipeline run --set sft.trl.save_strategy=no`: the typed config the pipeline builds, serialised
    by cli_args and parsed by the trainer's own CLI, gives TRL's SFTConfig the string "no" (YAML gave False)."""
    from moaa.cli.main import build_parser
    from moaa.cli.train import _config_from_args
    from moaa.overrides import apply_sets
    from moaa.pipeline.layout import RunLayout
    from moaa.pipeline.runner import PipelineOptions, resolve_settings, training_configs
    from moaa.trainer.config import cli_args

    args = build_parser().parse_args(["pipeline", "run", "--set", "sft.trl.save_strategy=no",
                                      "--set", "dpo.loss_type=[\"sigmoid\",\"sft\"]", "--set", "dpo.beta=0.2"])
    opts = PipelineOptions(out=tmp_path, gateway="g:1", overrides=apply_sets({}, args.overrides))
    cfgs = training_configs(resolve_settings(opts, local=False), RunLayout(tmp_path), "base")
    for kind, cfg in cfgs.items():
        back = _config_from_args(kind, build_parser().parse_args(["train", kind, *cli_args(cfg)]))
        assert back == cfg and type(back).__name__ == f"{kind.upper()}Settings"
    assert build_trl_args(cfgs["sft"], device="cpu").save_strategy == "no"
    dpo = build_trl_args(cfgs["dpo"], device="cpu")
    assert dpo.loss_type == ["sigmoid", "sft"] and dpo.beta == 0.2


def test_trl_values_are_checked_against_trl_types():
    with pytest.raises(UserError, match=r"trl.max_grad_norm='abc': Input should be a valid number \(TRL declares float\)"):
        load_train_config("sft", None, ["trl.max_grad_norm=abc"], **BASE)
    with pytest.raises(UserError, match=r"trl.dataloader_drop_last='no': Input should be a valid boolean"):
        load_train_config("sft", None, ["trl.dataloader_drop_last=no"], **BASE)
    cfg = load_train_config("sft", None, ["trl.save_strategy=no", "trl.max_grad_norm=1"], **BASE)
    assert cfg.trl == {"save_strategy": "no", "max_grad_norm": 1}


def test_check_flag_reports_what_trl_made_of_the_pass_through_and_trains_nothing(tmp_path, capsys):
    import json

    rc = main(["train", "sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--check",
               "--set", "trl.save_strategy=no", "--set", "trl.max_grad_norm=0.5"])
    assert rc == 0 and not (tmp_path / "o").exists()
    assert json.loads(capsys.readouterr().out) == {"event": "config_ok", "kind": "sft",
                                                   "trl": {"save_strategy": "no", "max_grad_norm": 0.5}}


def test_config_files_read_values_as_the_set_grammar_does(tmp_path):
    """YAML 1.1 reads `1e-8` as a string and `no` as false; a TRL user's YAML or JSON config means a float and
    the string "no" (one typing for --config and --set)."""
    yml = tmp_path / "c.yaml"
    yml.write_text("learning_rate: 1e-4\ntrl:\n  adam_epsilon: 1e-8\n  save_strategy: no\n"
                   "  dataloader_drop_last: true\n")
    jsn = tmp_path / "c.json"
    jsn.write_text('{"learning_rate": 1e-4, "trl": {"adam_epsilon": 1e-8, "eos_token": null, "max_grad_norm": 1}}')
    a = build_trl_args(load_train_config("sft", str(yml), **BASE), device="cpu")
    assert (a.learning_rate, a.adam_epsilon, a.save_strategy, a.dataloader_drop_last) == (1e-4, 1e-8, "no", True)
    b = build_trl_args(load_train_config("sft", str(jsn), **BASE), device="cpu")
    assert (b.learning_rate, b.adam_epsilon, b.eos_token, b.max_grad_norm) == (1e-4, 1e-8, None, 1.0)


@pytest.mark.parametrize("kind,item,value", [
    ("sft", "trl.optim=adamw_torch", ("optim", "adamw_torch")),
    ("sft", "trl.gradient_checkpointing_kwargs={\"use_reentrant\":false}",
     ("gradient_checkpointing_kwargs", {"use_reentrant": False})),
    ("sft", "trl.assistant_only_loss=true", ("assistant_only_loss", True)),
    ("sft", "trl.completion_only_loss=null", ("completion_only_loss", None)),
    ("sft", "trl.logging_strategy=no", ("logging_strategy", "no")),
    ("sft", "trl.dataloader_num_workers=2", ("dataloader_num_workers", 2)),
    ("sft", "trl.report_to=[]", ("report_to", [])),
    ("dpo", "trl.loss_weights=[1.0]", ("loss_weights", [1.0])),
    ("dpo", "trl.precompute_ref_log_probs=true", ("precompute_ref_log_probs", True)),
])
def test_trl_values_reach_trl_typed(kind, item, value):
    args = build_trl_args(load_train_config(kind, None, [item], **BASE), device="cpu")
    assert getattr(args, value[0]) == value[1]


def test_moaa_defaults_for_trl_fields_are_documented_and_overridable():
    from moaa.trainer.config import TRL_DEFAULTS

    args = build_trl_args(load_train_config("sft", None, **BASE), device="cpu")
    assert args.report_to in ([], ["none"], "none") and args.save_strategy == "steps" and args.disable_tqdm
    assert not args.gradient_checkpointing  # TRL's default is True; moaa's is documented as False
    sets = ["trl.save_strategy=epoch", "trl.disable_tqdm=false", "trl.dataloader_num_workers=1"]
    args = build_trl_args(load_train_config("sft", None, sets, **BASE), device="cpu")
    assert (args.save_strategy, args.disable_tqdm, args.dataloader_num_workers) == ("epoch", False, 1)
    assert set(TRL_DEFAULTS) == {"save_strategy", "report_to", "disable_tqdm", "dataloader_num_workers"}


@pytest.mark.parametrize("kind,item,setting", [
    ("sft", "trl.max_length=512", "max_length"), ("sft", "trl.packing=true", "packing"),
    ("sft", "trl.seed=3", "seed"), ("sft", "trl.data_seed=3", "seed"), ("sft", "trl.output_dir=x", "--out"),
    ("sft", "trl.gradient_accumulation_steps=4", "global_batch_size"),
    ("sft", "trl.per_device_train_batch_size=4", "per_device_batch_size"),
    ("sft", "trl.bf16=true", "precision"), ("sft", "trl.fp16=true", "precision"), ("sft", "trl.use_cpu=true", "device"),
    ("dpo", "trl.beta=0.5", "beta"), ("dpo", "trl.loss_type=[\"ipo\"]", "loss_type"),
    ("sft", "trl.chat_template_path=t.jinja", "chat_template"),
    ("sft", "gradient_accumulation_steps=4", "global_batch_size"),  # at the top level too, not "put it under trl:"
])
def test_trl_field_moaa_sets_itself_names_the_setting(kind, item, setting):
    """Silently taking trl.max_length would train on rows the length check never saw; trl.gradient_accumulation_steps
    would change the global batch the manifest reports. One route per value: moaa's own setting."""
    with pytest.raises(UserError, match=rf"moaa sets TRL's \w+ from its own setting {setting}.*: set {setting} inst"):
        load_train_config(kind, None, [item], **BASE)


def test_fp16_needs_a_gpu():
    # TRL on CPU ignores fp16 and trains in fp32 without a word
    with pytest.raises(UserError, match="precision fp16 needs a CUDA GPU \\(this run is on cpu\\)"):
        build_trl_args(load_train_config("sft", None, ["precision=fp16"], **BASE), device="cpu")
    cpu_bf16 = build_trl_args(load_train_config("sft", None, ["precision=bf16"], **BASE), device="cpu")
    assert cpu_bf16.bf16 and cpu_bf16.use_cpu  # documented: bf16 also trains on CPU


def test_dpo_loss_type_may_be_one_string_as_in_trl():
    cfg = load_train_config("dpo", None, ["loss_type=ipo"], **BASE)
    assert cfg.loss_type == ["ipo"] and build_trl_args(cfg, device="cpu").loss_type == ["ipo"]


def test_eval_strategy_needs_eval_data_and_eval_data_evaluates():
    with pytest.raises(UserError, match="trl.eval_strategy=steps needs held-out rows: set eval_data"):
        load_train_config("sft", None, ["trl.eval_strategy=steps"], **BASE)
    with pytest.raises(UserError, match="trl.eval_on_start=True needs held-out rows"):  # TRL: only at step 0
        load_train_config("sft", None, ["trl.eval_on_start=true"], **BASE)
    args = build_trl_args(load_train_config("dpo", None, ["eval_data=h.jsonl", "save_steps=7"], **BASE), device="cpu")
    assert (args.eval_strategy, args.eval_steps) == ("steps", 7)
    args = build_trl_args(load_train_config("sft", None, ["eval_data=h.jsonl", "trl.eval_strategy=no"], **BASE),
                          device="cpu")
    assert args.eval_strategy == "no"


@pytest.mark.parametrize("item,package,message", [
    ("trl.report_to=tensorboard", "tensorboard", "trl.report_to tensorboard: not installed here"),
    ("trl.use_liger_kernel=true", "liger_kernel", "trl.use_liger_kernel needs liger-kernel, which is not installed"),
])
def test_setting_whose_package_is_missing_exits_2_before_the_model_loads(item, package, message, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    rc = main(["train", "sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--set", item])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    # `--check` refuses what the run here would; a Job's packages are the trainer image's, not this machine's
    base = ["train", "sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--set", item, "--check"]
    assert main(base) == 2 and message in capsys.readouterr().err
    assert main([*base, "job"]) == 0 and not (tmp_path / "o").exists()


def test_trl_field_a_moaa_run_would_ignore_is_refused():
    for item in ("trl.resume_from_checkpoint=x", "resume_from_checkpoint=x"):
        with pytest.raises(UserError, match="resume_from_checkpoint: not taken: moaa resumes from the newest complete"):
            load_train_config("sft", None, [item], **BASE)
    # checkpoints without optimizer and scheduler state: a resume would start warmup and the optimizer over
    with pytest.raises(UserError, match="save_only_model: not taken: a resumed run needs its checkpoints' optimizer"):
        load_train_config("sft", None, ["trl.save_only_model=true"], **BASE)


def test_gpu_config_is_checked_where_there_is_no_gpu_and_refused_by_a_run_there(tmp_path, capsys):
    """`moaa train submit` from a machine without a GPU checks a Job's config (it used to refuse device cuda);
    the run itself, on a machine without a GPU, refuses device cuda / precision fp16 with one line before any
    model loads."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    for item in ("precision=fp16", "device=cuda"):
        rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "/models/m", "--out", "/checkpoints/o",
                   "--gpus", "1", "--dry-run", "--set", item])
        out = capsys.readouterr()
        assert rc == 0 and "kind: Job" in out.out, out.err
        rc = main(["train", "sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--set", item])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
        assert ("needs a CUDA GPU" if "fp16" in item else "no CUDA GPU is visible") in err
        # the pipeline checks its trainers' argv: for this machine, or (with --k8s) for the Jobs' GPU nodes
        base = ["train", "sft", "--data", "d", "--model", "m", "--out", str(tmp_path / "o"), "--set", item]
        assert main([*base, "--check"]) == 2 and main([*base, "--check", "job"]) == 0
        capsys.readouterr()


def test_paths_may_come_from_the_config_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ndata: d.jsonl\nout: {tmp_path / 'o'}\nmax_steps: 3\n")
    assert main(["train", "sft", "--config", str(path), "--check"]) == 0
    rc = main(["train", "dpo", "--model", "m", "--check"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "data is required: give --data, or data: in the --config file; out is required: give --out" in err


@pytest.mark.parametrize("kind, item", [("sft", "learning_rate=Infinity"), ("sft", "learning_rate=1e999"),
                                        ("sft", "num_train_epochs=Infinity"), ("sft", "warmup_steps=1e999"),
                                        ("sft", "startup_timeout_s=Infinity"), ("dpo", "beta=Infinity"),
                                        ("sft", "trl.max_grad_norm=1e999")])
def test_infinite_numbers_are_refused(kind, item):
    """An infinite learning rate trained to NaN weights and exited 0; infinite epochs crashed after writing."""
    with pytest.raises(UserError, match="finite number|valid number"):
        load_train_config(kind, None, [item], **BASE)
        build_trl_args(load_train_config(kind, None, [item], **BASE), check_only=True)


def test_settings_are_typed_strictly_but_a_whole_float_is_a_count():
    """As trl.* values are: true is no step count and "yes" no switch; 2.0 (or YAML's 1e+06) is a count."""
    for item in ("max_steps=true", 'max_steps="20"', "packing=yes", "lora.enabled=on", "save_steps=2.5"):
        with pytest.raises(UserError, match="valid"):
            load_train_config("sft", None, [item], **BASE)
    cfg = load_train_config("sft", None, ["save_steps=2.0", "max_steps=1e+06"], **BASE)
    assert (cfg.save_steps, cfg.max_steps) == (2, 1_000_000) and isinstance(cfg.save_steps, int)


def test_a_missing_chat_template_file_is_found_before_the_model_loads(tmp_path, capsys):
    """Here (a run, --check): exit 2 at once; a Job's file is on its node (--check job does not look)."""
    base = ["train", "sft", "--data", "d.jsonl", "--model", "m", "--out", str(tmp_path / "o"), "--set",
            f"chat_template={tmp_path / 'nope.jinja'}"]
    assert main([*base, "--check"]) == 2
    assert "chat_template" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([*base, "--check", "job"]) == 0


def test_a_library_refusal_keeps_its_later_lines_on_one_line():
    """A TRL refusal's first line can end mid-sentence ("... but found"): the message keeps all of it."""
    from moaa.errors import one_line

    assert one_line(ValueError("x must be set\n  but found None:\nset x")) == "x must be set but found None: set x"
    assert len(one_line("y" * 5000)) == 600
