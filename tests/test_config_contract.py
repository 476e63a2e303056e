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
                         capture_output=True, text=True, timeout=60, check=False)
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


@pytest.mark.parametrize("url", ["https://user:sk-SECRET99@api.example.com/v1", "https://api.example.com/v1?key=SECRET99"])
def test_a_key_in_a_backend_url_is_refused_without_repeating_it(url):
    """The URL is logged (probe warnings, errors); a key belongs in api_key_env or api_key_file."""
    msg = refused(with_(lambda d: d["backends"]["a"].update(urls=[url])))
    assert "backends.a.urls" in msg and "SECRET99" not in msg, msg
    assert "api_key_env" in msg or "query" in msg, msg


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


@pytest.mark.parametrize("change, where", [
    (lambda d: d["recipes"]["r"].update(layers=True), "recipes.r.layers"),       # YAML's yes/on/true
    (lambda d: d["backends"]["a"].update(max_concurrency="8"), "backends.a.max_concurrency"),
    (lambda d: d.update(gateway={"port": "50051"}), "gateway.port"),
    (lambda d: d["backends"]["a"].update(supports_n="no"), "backends.a.supports_n"),
    (lambda d: d["recipes"]["r"]["aggregator"].update(sampling={"temperature": "0.7"}), "sampling.temperature"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(change, where):
    """A quoted number or a boolean where a number belongs is a mistake in the file, not something to guess."""
    msg = refused(with_(change))
    assert where in msg and "valid" in msg, msg


def test_whole_numbers_are_fine_where_a_float_belongs():
    cfg = parse_config(with_(lambda d: d["backends"]["a"].update(rate_limit_per_s=2, timeouts={"total_s": 30})))
    assert cfg.backends["a"].rate_limit_per_s == 2.0 and cfg.backends["a"].timeouts.total_s == 30.0


@pytest.mark.parametrize("yaml_value", [".inf", ".nan", "-.inf"])
@pytest.mark.parametrize("key", ["rate_limit_per_s", "timeouts.total_s", "timeouts.connect_s"])
def test_infinite_limits_are_refused_in_the_file(tmp_path, key, yaml_value):
    """`.inf` once crashed the gateway's start with an OverflowError (exit 1); leave a limit out for none."""
    field = key.split(".")[-1]
    value = f"{{{field}: {yaml_value}}}" if "." in key else yaml_value
    msg = refused_file(tmp_path, f"backends:\n  a:\n    urls: [http://h:1/v1]\n    {key.split('.')[0]}: {value}\n")
    assert f"backends.a.{key}" in msg and "finite" in msg, msg


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


@pytest.mark.parametrize("address, needle", [
    ("not an address", "space"), ("moaa-annotator", "port"), ("moaa-annotator:http", "port"),
    (":50052", "host"), ("moaa-annotator:70000", "port"),
])
def test_annotator_address_is_checked_at_load_not_at_the_first_annotate_call(address, needle):
    msg = refused(with_(lambda d: d.update(annotator_address=address)))
    assert "annotator_address" in msg and needle in msg, msg


@pytest.mark.parametrize("address", ["moaa-annotator:50052", "10.0.0.7:50052", "[::1]:50052",
                                     "dns:///moaa-annotator:50052", "unix:/run/moaa/annotator.sock"])
def test_annotator_address_forms_grpc_takes(address):
    assert parse_config(with_(lambda d: d.update(annotator_address=address))).annotator_address == address


def test_gateway_start_failing_on_the_annotator_ca_prints_one_line(tmp_path):
    """The CA is read before the backend pool opens: no 'Unclosed client session' report after the error."""
    data = with_(lambda d: d.update(annotator_address="127.0.0.1:1", annotator_tls={"ca_file": str(tmp_path / "no-ca.crt")}))
    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config", str(path), "--port", "0",
                          "--no-http"], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "no-ca.crt" in out.stderr, out.stderr


@pytest.mark.parametrize("key", ["max_candidates", "max_candidate_bytes"])
def test_annotator_only_settings_in_the_gateway_section_are_errors_not_ignored(key):
    msg = refused(with_(lambda d: d.update(gateway={key: 8})))
    assert f"gateway.{key}" in msg, msg
    assert getattr(parse_config(with_(lambda d: d.update(annotator={key: 8}))).annotator, key) == 8


def test_chart_refuses_annotator_only_settings_under_gateway_server(helm, tmp_path):
    from tests.fixtures.helm import HelmFailed

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"gateway": {"server": {"max_candidates": 8}}}))
    with pytest.raises(HelmFailed, match="/gateway/server': additional properties 'max_candidates' not allowed"):
        helm.template([values])


# -- the README's reference -------------------------------------------------------------------------------

def readme_reference() -> str:
    """The YAML block of the README's "Configuration reference"."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Configuration reference"):]
    start = section.index("```yaml") + len("```yaml")
    return section[start:section.index("```", start)]


def test_the_readme_configuration_reference_is_a_valid_config():
    cfg = parse_config(yaml.safe_load(readme_reference()), "README")
    b = cfg.backends["qwen-72b"]
    assert (b.max_concurrency, b.max_queued, b.timeouts.total_s, b.retries.max_attempts) == (32, 4096, 600, 3)
    # the values the reference gives as defaults are the code's defaults
    from moaa.services.config import AnnotatorConfig, BackendConfig, EnsembleConfig, GatewayConfig, RecipeConfig

    given = {BackendConfig: (b, ["max_concurrency", "max_queued", "supports_n"]),
             RecipeConfig: (cfg.recipes["moa"], ["layers", "aggregate_instruction", "reference_max_tokens"]),
             EnsembleConfig: (cfg.ensembles["moa-rm"], [
                 "mode", "combine", "min_margin", "min_agreement", "max_abstain_fraction", "criteria_filter",
                 "max_criterion_disagreement", "max_criterion_length_corr", "criteria_length_min_candidates",
                 "scale_min", "scale_max", "seed", "pointwise_template", "pairwise_template", "aggregator_template",
                 "templates_dir"]),
             GatewayConfig: (cfg.gateway, ["port", "http_port", "max_in_flight", "max_prompt_chars", "max_request_bytes",
                                           "batch_window", "shutdown_grace_s"]),
             AnnotatorConfig: (cfg.annotator, ["port", "max_candidates", "max_candidate_bytes"])}
    for model, (obj, keys) in given.items():
        for key in keys:
            assert getattr(obj, key) == model.model_fields[key].default, f"{model.__name__}.{key}"
    for part in ("timeouts", "retries", "circuit", "health"):
        assert getattr(b, part) == type(getattr(b, part))(), part


def _field_names(model, seen=None):
    """Every key a config file may hold, through nested models, dicts and lists of them."""
    import typing

    from pydantic import BaseModel

    seen = set() if seen is None else seen
    for name, f in model.model_fields.items():
        yield name
        todo = [f.annotation]
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                if t not in seen:
                    seen.add(t)
                    yield from _field_names(t, seen)
            else:
                todo.extend(typing.get_args(t))


def test_the_readme_configuration_reference_names_every_key():
    """A user writing a config from the README finds every key the validator accepts."""
    from moaa.services.config import MoaaConfig

    block = readme_reference()
    missing = sorted({n for n in _field_names(MoaaConfig) if f"{n}:" not in block})
    assert not missing, f"README's configuration reference lacks {missing}"


# -- the Helm chart's rendering of the same file ----------------------------------------------------------

USER_VALUES = {
    "models": [
        {"name": "qwen", "model": "Qwen/Qwen2.5-0.5B-Instruct", "roles": ["proposer", "aggregator", "judge"], "gpus": 1,
         "backend": {"max_concurrency": 64, "max_queued": 10_000_000, "rate_limit_per_s": 0.5,
                     "timeouts": {"total_s": 1200}, "retries": {"max_attempts": 5}}},
        {"name": "llama", "model": "meta-llama/Llama-3.2-1B-Instruct", "servedModelName": "llama-1b",
         "roles": ["proposer", "judge"], "vllm": {"maxModelLen": 131072}},
    ],
    "gateway": {
        "extraBackends": {"gpt": {"urls": ["https://api.openai.com/v1/"], "served_model": "gpt-4o-mini",
                                  "api_key_env": "OPENAI_API_KEY", "max_concurrency": 8, "rate_limit_per_s": 2.5}},
        "env": [{"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}}}],
        "recipes": {"mine": {
            "proposers": [{"model": "qwen", "sampling": {"temperature": 0.7, "max_tokens": 1024, "stop": ["</s>"]}},
                          {"model": "llama"}, {"model": "gpt"}],
            "aggregator": {"model": "gpt", "sampling": {"temperature": 0.0, "seed": 1234567890}},
            "layers": 2, "min_proposers": 2, "layer_deadline_s": 12.5}},
        "defaultRecipe": "mine",
        "server": {"max_in_flight": 2048, "max_request_bytes": 16_777_216, "batch_window": 100_000},
    },
    "annotator": {
        "ensembles": {"rm": {"judges": [{"name": "q", "model": "qwen", "weight": 1.5}, {"name": "l", "model": "llama"}],
                             "mode": "pointwise", "combine": "weighted", "min_margin": 0.25}},
        "defaultEnsemble": "rm",
        "server": {"max_candidates": 8},
    },
}


def test_chart_renders_user_values_into_a_config_the_validator_loads(helm, tmp_path):
    """Several models with limits, a hosted backend whose key comes from a Secret, a custom recipe and
    ensemble: every value arrives in the ConfigMap and moaa's own loader accepts the file as rendered."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(USER_VALUES))
    r = helm.template([values])
    path = tmp_path / "moaa.yaml"
    path.write_text(r.config_text())
    cfg = load_config(path)
    qwen, llama, gpt = cfg.backends["qwen"], cfg.backends["llama"], cfg.backends["gpt"]
    assert (qwen.max_concurrency, qwen.max_queued, qwen.rate_limit_per_s, qwen.timeouts.total_s,
            qwen.retries.max_attempts) == (64, 10_000_000, 0.5, 1200, 5)
    assert qwen.urls == ["http://moaa-qwen:8000/v1"] and qwen.served_model == "qwen"
    assert (llama.served_model, llama.context_window) == ("llama-1b", 131072)
    assert gpt.urls == ["https://api.openai.com/v1"] and gpt.api_key_env == "OPENAI_API_KEY"
    assert gpt.max_concurrency == 8 and gpt.rate_limit_per_s == 2.5
    name, recipe = cfg.recipe(None)
    assert name == "mine" and recipe.layers == 2 and recipe.layer_deadline_s == 12.5
    assert [a.model for a in recipe.proposers] == ["qwen", "llama", "gpt"]
    assert recipe.proposers[0].sampling.stop == ["</s>"] and recipe.aggregator.sampling.seed == 1234567890
    ename, ens = cfg.ensemble(None)
    assert ename == "rm" and ens.combine == "weighted" and ens.judges[0].weight == 1.5
    assert (cfg.gateway.max_in_flight, cfg.gateway.max_request_bytes, cfg.gateway.batch_window) == (2048, 16_777_216, 100_000)
    assert cfg.annotator.max_candidates == 8
    # the key reaches the gateway from the Secret, never through the ConfigMap
    assert "OPENAI_API_KEY" not in str(r.config_text()).replace("api_key_env: OPENAI_API_KEY", "")
    gw = r.get("Deployment", "moaa-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "OPENAI_API_KEY", "valueFrom": {"secretKeyRef": {"name": "openai", "key": "key"}}} in gw["env"]


async def test_annotator_starts_without_the_keys_of_backends_no_ensemble_uses(monkeypatch):
    """The chart gives the annotator the gateway's whole config: a hosted backend only a recipe uses (its key
    set on the gateway pods, per values.yaml's gateway.env) must not stop the annotator at start."""
    from moaa.services.annotator.server import start_annotator

    monkeypatch.delenv("MOAA_TEST_UNSET_KEY", raising=False)
    data = with_(lambda d: d["backends"].update(hosted={"urls": ["https://api.example.com/v1"],
                                                         "api_key_env": "MOAA_TEST_UNSET_KEY"}))
    data["recipes"]["r"]["aggregator"]["model"] = "hosted"
    data["annotator"] = {"port": 0}
    server = await start_annotator(parse_config(data), port=0, probes=False)
    try:
        assert "hosted" not in server.servicer.engine.pool
    finally:
        await server.stop(0)


def test_eval_judge_settings_go_through_the_same_one_line_errors(tmp_path):
    """`moaa eval --judge-api-key-env` with the key pasted in: exit 2, one line, and the key is not printed."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"id": "1", "prompt": [{"role": "user", "content": "hi"}], "answer": "x"}\n')
    out = subprocess.run([sys.executable, "-m", "moaa.cli.main", "eval", "--answers", str(answers), "--baseline",
                          str(answers), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
                          "--judge-api-key-env", "sk-proj-SECRET123", "--out", str(tmp_path / "ev")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "api_key_env" in out.stderr, out.stderr
    assert "SECRET123" not in out.stderr + out.stdout


def test_chart_refuses_an_annotator_with_no_ensemble_at_render(helm, tmp_path):
    """No judge-role model and no annotator.ensembles: the config has no ensemble, and the annotator pod
    would stop at start (`the config has no ensembles`) in a crash loop after a successful install."""
    from tests.fixtures.helm import HelmFailed

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"models": [{"name": "m", "model": "org/m", "roles": ["proposer", "aggregator"]}]}))
    with pytest.raises(HelmFailed, match="annotator.enabled needs a judge ensemble"):
        helm.template([values])
    r = helm.template([values], sets={"annotator.enabled": "false"})
    assert not [d for d in r.of_kind("Deployment") if d["metadata"]["name"] == "moaa-annotator"]


def test_max_request_bytes_is_bounded_by_grpc():
    """Over 2 GiB - 1, gRPC's server refused to start with an OverflowError (exit 1)."""
    msg = refused(with_(lambda d: d.update(annotator={"max_request_bytes": 2**31})))
    assert "annotator.max_request_bytes" in msg and "2147483647" in msg, msg


@pytest.mark.parametrize("command", [["gateway", "serve", "--no-http"], ["annotator", "serve"]])
def test_a_port_in_use_is_one_line_saying_which_setting(tmp_path, command):
    import socket

    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "moaa.cli.main", *command, "--config", str(path), "--host",
                              "127.0.0.1", "--port", str(port)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert f"127.0.0.1:{port}" in out.stderr and f"{command[0]}.port" in out.stderr, out.stderr


def test_a_written_config_reads_back_under_the_strict_types(tmp_path):
    """What dump_config writes (the pipeline's file for the embedded backends) loads back equal."""
    from moaa.services.config import dump_config

    cfg = parse_config(yaml.safe_load(readme_reference()))
    path = tmp_path / "moaa.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_chart_small_floats_written_as_exponents_load_as_numbers(helm, tmp_path):
    """Helm writes 0.000001 as `1e-06`, which YAML 1.1 reads as a string: the config is read with YAML 1.2
    numbers (moaa.overrides.load_mapping, the one reader of moaa's files), so it stays a number."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "models": [{"name": "m", "model": "org/m", "roles": ["proposer", "aggregator", "judge"],
                    "backend": {"rate_limit_per_s": 0.0000005, "retries": {"backoff_base_s": 0.00001}}}],
        "annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "m"}], "mode": "pointwise",
                                          "combine": "mean", "min_margin": 0.000001}}}}))
    text = helm.template([values]).config_text()
    assert "1e-06" in text  # what this test is about
    path = tmp_path / "moaa.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.ensembles["e"].min_margin == 1e-06 and cfg.backends["m"].rate_limit_per_s == 5e-07
    assert cfg.backends["m"].retries.backoff_base_s == 1e-05


def test_yaml_11_words_are_not_booleans(tmp_path):
    """`supports_n: no` is YAML 1.1's false but a string to YAML 1.2 (the trainer's files too): an error
    that names the key, rather than two readings of the same word in two moaa files."""
    msg = refused_file(tmp_path, "backends:\n  a: {urls: [http://h:1/v1], supports_n: no}\n")
    assert "backends.a.supports_n" in msg and "boolean" in msg, msg


def test_training_config_files_share_the_reader_and_its_repeated_key_rule(tmp_path):
    from moaa.errors import UserError
    from moaa.overrides import load_mapping

    path = tmp_path / "sft.yaml"
    path.write_text("learning_rate: 1e-5\nmax_steps: 10\nmax_steps: 20\n")
    with pytest.raises(UserError, match="'max_steps' is given twice"):
        load_mapping(path)


async def test_a_base_url_without_the_api_path_fails_saying_so(emulator, pool_of):
    """`http://host:8000` (no /v1) cannot be told from a server that serves at its root (some do) when the
    config is read; the first 404 says which URL was asked and what the base usually ends in."""
    from moaa.services.backend.errors import BackendError
    from moaa.services.config import parse_backend

    pool = await pool_of({"m": parse_backend({"urls": [emulator.root], "retries": {"max_attempts": 1}}, "test")})
    with pytest.raises(BackendError) as err:
        await pool.client("m").chat([{"role": "user", "content": "hi"}])
    assert err.value.http_status == 404 and f"{emulator.root}/chat/completions" in str(err.value), err.value
    assert "/v1" in str(err.value), err.value
