"""Packaging, generated stubs, config loading and the CLI's error contract."""
import subprocess
import sys
from pathlib import Path

import pytest

from moaa.services.config import ConfigError, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = {
    "backends": {"m": {"urls": ["http://127.0.0.1:9/v1"]}},
    "recipes": {"r": {"proposers": [{"model": "m"}, {"model": "m"}], "aggregator": {"model": "m"}}},
}


def test_stubs_are_fresh():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_packages_are_mapped_under_moaa():
    import moaa.services
    import moaa.trainer

    assert Path(moaa.services.__file__).parent.name == "services"
    assert Path(moaa.trainer.__file__).parent.name == "trainer"


def test_config_round_trips(tmp_path):
    cfg = parse_config(MINIMAL)
    path = tmp_path / "moaa.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert cfg.recipe(None)[0] == "r"


@pytest.mark.parametrize("data,needle", [
    ({"backends": {}}, "backends"),
    ({"backends": {"m": {"urls": ["ftp://x"]}}}, "http://"),
    ({**MINIMAL, "recipes": {"r": {"proposers": [{"model": "zz"}], "aggregator": {"model": "m"}}}}, "'zz'"),
    ({**MINIMAL, "extra_key": 1}, "extra_key"),
    ({**MINIMAL, "recipes": {"r": {"proposers": [{"model": "m"}], "aggregator": {"model": "m"}, "min_proposers": 3}}},
     "min_proposers"),
])
def test_config_errors_are_readable(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_bad_arguments_exit_2_with_one_line():
    out = subprocess.run([sys.executable, "-m", "moaa.cli.main", "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "error" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag,value,what", [
    ("--limit", "0", "a positive whole number"), ("--limit", "1.5", "a positive whole number"),
    ("--token-budget", "x", "a positive whole number")])
def test_cli_number_flags_exit_2_with_one_line(flag, value, what, capsys):
    from moaa.cli import positive_float
    from moaa.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "run", flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"expected {what}, got '{value}'" in err
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(Exception, match=f"expected a positive number, got '{bad}'"):
            positive_float(bad)
    assert positive_float("1e-9") == 1e-9


def test_tiny_model_loads_and_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.head_dim == 32
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
