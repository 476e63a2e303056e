"""The one config from the outside: what a user's own YAML gets back (one readable line, exit 2) and what
the Helm chart and the README hand to the same validator (moaa.services.config)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from moaa.services.config import ConfigError, load_config, parse_config
from tests.fixtures.helm import ROOT

BASE = {
    "backends": {"a": {"urls": ["http://127.0.0.1:9/v1"]}, "b": {"urls": ["http://127.0.0.1:10/v1"]}},
    "recipes": {"r": {"proposers": [{"model": "a"}, {"model": "b"}], "aggregator": {"model": "a"}}},
    "ensembles": {"e": {"judges": [{"name": "j", "model": "a"}], "aggregator": {"name": "k", "model": "b"}}},
}


def with_(change) -> dict:
    data = copy.deepcopy(BASE)
    change(data)
    return data


def refused(data: dict) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def refused_file(tmp_path, raw: bytes | str) -> str:
    path = tmp_path / "moaa.yaml"
    path.write_bytes(raw.encode() if isinstance(raw, str) else raw)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# -- the file itself ---------------------------------------------------------------------------------------

def test_a_repeated_key_is_an_error_not_last_one_wins(tmp_path):
    """A copied backend block whose name was not changed must not silently replace the first one."""
    msg = refused_file(tmp_path, "backends:\n  a: {urls: [http://h:1/v1]}\n  a: {urls: [http://h:2/v1]}\n")
    assert "'a'" in msg and "line 3" in msg and "twice" in msg, msg
    nested = "backends:\n  a:\n    urls: [http://h:1/v1]\n    max_concurrency: 2\n    max_concurrency: 4\n"
    assert "max_concurrency" in refused_file(tmp_path, nested)


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "moaa.yaml"
    path.write_text("backends:\n  a: &d {max_concurrency: 4, urls: [http://h:1/v1]}\n"
                    "  b: {<<: *d, urls: [http://h:2/v1]}\n")
    cfg = load_config(path)
    assert cfg.backends["b"].max_concurrency == 4 and cfg.backends["b"].urls == ["http://h:2/v1"]


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path):
    msg = refused_file(tmp_path, b"backends:\n  a: {urls: [http://h:1/v1]}\n# caf\xe9\n")
    assert "not UTF-8" in msg and "line 3" in msg, msg


def test_a_yaml_syntax_error_is_one_line_with_the_place(tmp_path):
    msg = refused_file(tmp_path, "backends:\n  a: {urls: [http://h:1/v1]\n")
    assert "not valid YAML" in msg and "line 2" in msg, msg


@pytest.mark.parametrize("command", [["gateway", "serve", "--no-http"], ["annotator", "serve"]])
def test_serve_commands_refuse_a_bad_file_at_start_with_exit_2(tmp_path, command):
    path = tmp_path / "moaa.yaml"
    path.write_bytes(b"backends:\n  a: {urls: [http://h:1/v1]}\n  a: {urls: [http://h:2/v1]}\n# \xff\n")
    out = subprocess.run([sys.executable, "-m", "moaa.cli.main", *command, "--config", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr, out.stderr


# -- backends ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, needle", [
    ("http://", "no host"),
    ("http:///v1", "no host"),
    ("http://vllm qwen:8000/v1", "space"),
    ("http://vllm:8000/v1/chat/completions", "base URL"),
    ("http://vllm:99999/v1", "port"),
])
def test_backend_urls_that_cannot_work_are_refused(url, needle):
    msg = refused(with_(lambda d: d["backends"]["a"].update(urls=[url])))
    assert "backends.a.urls" in msg and needle in msg, msg


def test_backend_urls_normalised_and_not_repeated():
    cfg = parse_config(with_(lambda d: d["backends"]["a"].update(urls=["https://api.example.com/v1/", "http://h:8000"])))
    assert cfg.backends["a"].urls == ["https://api.example.com/v1", "http://h:8000"]
    msg = refused(with_(lambda d: d["backends"]["a"].update(urls=["http://h:1/v1", "http://h:1/v1/"])))
    assert "twice" in msg and "http://h:1/v1" in msg, msg


def test_api_key_from_one_place_only():
    msg = refused(with_(lambda d: d["backends"]["a"].update(api_key_env="KEY", api_key_file="/run/key")))
    assert "api_key_env" in msg and "api_key_file" in msg and "one of" in msg, msg


@pytest.mark.parametrize("value", ["sk-proj-abc123DEF456", "", "MY KEY"])
def test_api_key_env_must_name_a_variable_and_the_key_is_never_echoed(value):
    msg = refused(with_(lambda d: d["backends"]["a"].update(api_key_env=value)))
    assert "backends.a.api_key_env" in msg and "name of an environment variable" in msg, msg
    if value:
        assert value not in msg


@pytest.mark.parametrize("key", ["served_model", "api_key_file", "tokenizer"])
def test_empty_strings_are_refused_where_a_name_is_needed(key):
    assert f"backends.a.{key}" in refused(with_(lambda d: d["backends"]["a"].update({key: ""})))


def test_empty_names_are_refused():
    assert "backends" in refused(with_(lambda d: d["backends"].update({"": {"urls": ["http://h:1/v1"]}})))
    assert "recipes" in refused(with_(lambda d: d["recipes"].update({"": d["recipes"]["r"]})))
    assert "judges.0.name" in refused(with_(lambda d: d["ensembles"]["e"]["judges"][0].update(name="")))


# -- ensembles and servers ---------------------------------------------------------------------------------

def test_the_aggregator_judge_needs_its_own_name():
    """Logs, usage and failures are kept per judge name: a shared name would merge two judges' records."""
    msg = refused(with_(lambda d: d["ensembles"]["e"]["aggregator"].update(name="j")))
    assert "ensembles.e" in msg and "'j'" in msg and "aggregator" in msg, msg


@pytest.mark.parametrize("tls, needle", [
    ({"cert_file": "/tls/tls.crt"}, "key_file"),
    ({"key_file": "/tls/tls.key"}, "cert_file"),
    ({"client_ca_file": "/tls/ca.crt"}, "client_ca_file"),
])
@pytest.mark.parametrize("server", ["gateway", "annotator"])
def test_half_a_tls_setting_is_an_error_not_plaintext(server, tls, needle):
    msg = refused(with_(lambda d: d.update({server: {"tls": tls}})))
    assert f"{server}.tls" in msg and needle in msg, msg


# -- the README's reference -------------------------------------------------------------------------------

def test_the_readme_configuration_reference_is_a_valid_config():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration reference"):]
    start = section.index("```yaml") + len("```yaml")
    block = section[start:section.index("```", start)]
    cfg = parse_config(yaml.safe_load(block), "README")
    b = cfg.backends["qwen-72b"]
    assert (b.max_concurrency, b.max_queued, b.timeouts.total_s, b.retries.max_attempts) == (32, 4096, 600, 3)
