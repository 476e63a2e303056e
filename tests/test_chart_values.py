"""values.schema.json and the chart's own checks: bad values fail `helm template` with a readable message."""
from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import yaml

from moaa.services.config import MoaaConfig, parse_config
from tests.fixtures.helm import CHART, ROOT, HelmFailed


def gen_schema():
    spec = importlib.util.spec_from_file_location("moaa_gen_chart_schema", ROOT / "tools" / "gen_chart_schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def values_file(tmp_path, data: dict):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rejected(helm, tmp_path, data: dict) -> str:
    with pytest.raises(HelmFailed) as err:
        helm.template([values_file(tmp_path, data)])
    return str(err.value)


MODEL = {"name": "m", "model": "org/m", "roles": ["proposer", "aggregator"]}
JUDGE_MODEL = {**MODEL, "roles": ["proposer", "aggregator", "judge"]}


@pytest.mark.parametrize("data, message", [
    ({"models": [{"model": "org/m"}]}, "at '/models/0': missing property 'name'"),
    ({"models": [{**MODEL, "replicas": -1}]}, "at '/models/0/replicas': minimum: got -1, want 0"),
    ({"models": [{**MODEL, "roles": ["proposer", "critic"]}]},
     "at '/models/0/roles/1': value must be one of 'proposer', 'aggregator', 'judge', 'target'"),
    ({"modelz": []}, "additional properties 'modelz' not allowed"),
    ({"models": [{**MODEL, "gpu": 1}]}, "at '/models/0': additional properties 'gpu' not allowed"),
    ({"models": [{**MODEL, "name": "Big_Model"}]}, "at '/models/0/name'"),
    ({"models": [{**MODEL, "vllm": {"dtype": "fp8"}}]}, "at '/models/0/vllm/dtype'"),
    ({"gateway": {"recipes": {"r": {"proposers": [{"model": "m"}], "aggregator": {"model": "m"}, "layerz": 2}}}},
     "at '/gateway/recipes/r': additional properties 'layerz' not allowed"),
    ({"models": [{**MODEL, "backend": {"urls": ["http://x"]}}]},
     "at '/models/0/backend': additional properties 'urls' not allowed"),
    ({"auth": {"key": "moaa/tokens"}}, "at '/auth/key'"),   # a Secret's data key: no '/'
    # the key itself pasted where its variable's name belongs (it would sit in a ConfigMap)
    ({"gateway": {"extraBackends": {"hosted": {"urls": ["https://api.example/v1"], "api_key_env": "sk-proj-abc123"}}}},
     "at '/gateway/extraBackends/hosted/api_key_env'"),
])
def test_schema_rejects_bad_values(helm, tmp_path, data, message):
    out = rejected(helm, tmp_path, data)
    assert "values don't meet the specifications of the schema" in out
    assert message in out, out


@pytest.mark.parametrize("data, message", [
    ({"models": [MODEL, MODEL]}, 'models: the name "m" is used twice'),
    ({"models": [{**MODEL, "gpus": 2, "vllm": {"tensorParallelSize": 4}}]},
     "vllm.tensorParallelSize=4 needs at least 4 GPUs, but gpus=2"),
    ({"tls": {"enabled": True}}, "tls.secretName is empty"),
    ({"models": [{**MODEL, "name": "gateway"}]},
     'models: the name "gateway" would make a second Deployment and Service moaa-gateway; pick another'),
    ({"models": [{**MODEL, "name": "annotator"}]}, 'models: the name "annotator" would make a second'),
    ({"gateway": {"extraBackends": {"qwen": {"urls": ["https://api.example/v1"]}}}},
     "gateway.extraBackends.qwen: a model of the chart already has this name"),
    ({"gateway": {"metricsPort": 50051}}, "gateway: port, metricsPort and httpPort must differ (one Service port each"),
    ({"annotator": {"metricsPort": 50052}}, "annotator: port, metricsPort must differ"),
    ({"models": [{**MODEL, "roles": ["proposer", "judge"]}]},
     "gateway.enabled needs a recipe: give a model the aggregator role, set gateway.recipes"),
])
def test_chart_rejects_inconsistent_values(helm, tmp_path, data, message):
    assert message in rejected(helm, tmp_path, data)


@pytest.mark.parametrize("data, message", [
    ({"gateway": {"recipes": {"r": {"proposers": [{"model": "qwen"}], "aggregator": {"model": "qwn"}}}}},
     'gateway.recipes.r uses model "qwn", which no backend declares (backends: qwen)'),
    ({"gateway": {"recipes": {"r": {"proposers": [{"model": "llama"}], "aggregator": {"model": "qwen"}}}}},
     'gateway.recipes.r uses model "llama", which no backend declares (backends: qwen)'),
    ({"annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "gpt"}]}}}},
     'annotator.ensembles.e judge "j" uses model "gpt", which no backend declares (backends: qwen)'),
    ({"gateway": {"defaultRecipe": "fast"}}, 'gateway.defaultRecipe "fast" is not a recipe (recipes: default)'),
    # the loader's rules within a recipe or an ensemble
    ({"gateway": {"recipes": {"r": {"proposers": [{"model": "qwen"}] * 2, "aggregator": {"model": "qwen"},
                                    "min_proposers": 3}}}}, "gateway.recipes.r: min_proposers=3 exceeds the 2 proposers"),
    ({"gateway": {"recipes": {"r": {"proposers": [{"model": "qwen"}], "aggregator": {"model": "qwen"},
                                    "first_k": 2}}}}, "gateway.recipes.r: first_k=2 exceeds the 1 proposers"),
    ({"annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "qwen"}] * 2}}}},
     "annotator.ensembles.e: judge names must be unique; repeated: j"),
    ({"annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "qwen"}], "min_judges": 3}}}},
     "annotator.ensembles.e: min_judges=3 exceeds the 1 judges"),
    ({"annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "qwen"}], "scale_min": 5, "scale_max": 5}}}},
     "annotator.ensembles.e: scale_max must be larger than scale_min"),
])
def test_chart_refuses_references_the_config_loader_would_refuse(helm, tmp_path, data, message):
    """The pod's config loader (MoaaConfig) refuses these at start, so the pod would crash-loop: the render
    fails first, with one line naming the recipe and the model, and the loader agrees it is bad."""
    out = rejected(helm, tmp_path, data)
    (line,) = [ln for ln in out.splitlines() if message in ln]
    assert "execution error" in line and line.rstrip().endswith(message), out
    good = helm.template()
    cfg = yaml.safe_load(good.config_text())
    for key, val in (data.get("gateway") or {}).items():
        cfg[{"recipes": "recipes", "defaultRecipe": "default_recipe"}[key]] = val
    for key, val in (data.get("annotator") or {}).items():
        cfg["ensembles"] = val
    with pytest.raises(Exception):
        parse_config(cfg)


def test_extra_backends_count_as_declared(helm, tmp_path):
    data = {"gateway": {"extraBackends": {"hosted": {"urls": ["https://api.example/v1"], "served_model": "x"}},
                        "recipes": {"r": {"proposers": [{"model": "hosted"}], "aggregator": {"model": "qwen"}}}}}
    cfg = parse_config(yaml.safe_load(helm.template([values_file(tmp_path, data)]).config_text()))
    assert cfg.recipes["r"].proposers[0].model == "hosted"


def test_model_settings_merge_over_defaults_and_keep_zeros(helm, tmp_path):
    """replicas: 0 and a single probe key override the defaults (sprig's merge would drop the zero)."""
    r = helm.template([values_file(tmp_path, {
        "modelDefaults": {"replicas": 3, "gpus": 1, "vllm": {"maxModelLen": 8192}},
        "models": [{**MODEL, "replicas": 0, "gpus": 0, "probes": {"startup": {"failureThreshold": 200}}},
                   {"name": "small", "model": "org/small", "roles": ["judge"]}],
    })])
    deps = {d["metadata"]["name"]: d for d in r.of_kind("Deployment")}
    m, n = deps["moaa-m"], deps["moaa-small"]
    assert m["spec"]["replicas"] == 0 and n["spec"]["replicas"] == 3
    mc, nc = m["spec"]["template"]["spec"]["containers"][0], n["spec"]["template"]["spec"]["containers"][0]
    assert mc["startupProbe"]["failureThreshold"] == 200 and mc["startupProbe"]["periodSeconds"] == 10
    assert "nvidia.com/gpu" not in mc["resources"].get("limits", {}) and nc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--max-model-len=8192" in mc["args"]
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert cfg.backends["m"].context_window == 8192
    assert [j.model for j in cfg.ensembles["default"].judges] == ["small"]


def test_recipes_ensembles_and_extra_backends_pass_through(helm, tmp_path):
    recipe = {"proposers": [{"model": "m", "sampling": {"temperature": 0.7}}, {"model": "hosted"}],
              "aggregator": {"model": "m", "system_prompt": "be brief"}, "layers": 2, "first_k": 1}
    r = helm.template([values_file(tmp_path, {
        "models": [MODEL],
        "gateway": {"recipes": {"two": recipe}, "defaultRecipe": "two", "server": {"max_in_flight": 7},
                    "extraBackends": {"hosted": {"urls": ["https://api.example.com/v1"], "api_key_env": "KEY"}}},
        "annotator": {"ensembles": {"e": {"judges": [{"name": "j", "model": "m"}], "mode": "pointwise"}},
                      "defaultEnsemble": "e"},
    })])
    raw = yaml.safe_load(r.config_text())
    assert raw["recipes"] == {"two": recipe} and raw["default_recipe"] == "two"
    assert raw["backends"]["hosted"] == {"urls": ["https://api.example.com/v1"], "api_key_env": "KEY"}
    assert raw["gateway"]["max_in_flight"] == 7 and raw["default_ensemble"] == "e"
    parse_config(raw)


def test_schema_is_generated_from_the_chart_spec(tmp_path):
    """The chart part of values.schema.json is what tools/gen_chart_schema.py writes."""
    committed = json.loads((CHART / "values.schema.json").read_text())
    fresh = gen_schema().build()
    assert {k: v for k, v in committed.items() if k != "$defs"} == {k: v for k, v in fresh.items() if k != "$defs"}


def test_schema_config_parts_match_the_config_model():
    """Every config key the chart schema accepts is one the gateway's config model accepts.

    (New config fields missing from the schema are reported by `python tools/gen_chart_schema.py --check`.)
    """
    defs = json.loads((CHART / "values.schema.json").read_text())["$defs"]
    live = MoaaConfig.model_json_schema()["$defs"]
    aliases = {"ModelBackend": "BackendConfig", "GatewaySettings": "GatewayConfig", "AnnotatorSettings": "AnnotatorConfig"}
    for name, d in defs.items():
        props, known = set(d.get("properties", {})), set(live[aliases.get(name, name)]["properties"])
        assert props <= known, f"{name}: the chart schema accepts {sorted(props - known)}, the config does not"
        assert d.get("additionalProperties") is False, name
        new = known - props - {"urls", "served_model", "context_window", "host", "port", "metrics_port", "tls", "auth",
                               "http_port"}
        if new:  # not an error (Helm just refuses them), but worth regenerating the schema
            warnings.warn(f"config {name} has fields the chart schema lacks: {sorted(new)}; "
                          "run python tools/gen_chart_schema.py")


def _walk(node, path="$"):
    if isinstance(node, dict):
        if "properties" in node or node.get("type") in ("string", "integer", "number", "boolean", "array"):
            yield path, node
        for k, v in node.get("properties", {}).items():
            yield from _walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")


def test_every_chart_value_is_described_and_objects_are_closed():
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path, node in _walk({k: v for k, v in schema.items() if k != "$defs"}):
        if path != "$":
            assert node.get("description"), f"{path} has no description"
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
    # and every key of values.yaml, at every depth, is in the schema once: a key written twice in a mapping
    # (YAML keeps the last) would hide the first one's comment and default from users
    class Unique(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            dup = {k for k in keys if keys.count(k) > 1}
            assert not dup, f"values.yaml line {node.start_mark.line + 1}: {sorted(dup)} given twice"
            return super().construct_mapping(node, deep)

    def keys(values, node, path):
        props = node.get("properties")
        if not isinstance(values, dict) or props is None:
            return
        for k, v in values.items():
            assert k in props, f"{path}.{k} is in values.yaml but not in the schema"
            keys(v, props[k], f"{path}.{k}")
    keys(yaml.load((CHART / "values.yaml").read_text(), Loader=Unique), schema, "$")


def test_transport_settings_pass_through_and_are_checked(helm, tmp_path):
    """gateway.server.transport / annotator.server.transport (services/common/transport.py) reach the config
    file; a mistyped or out-of-range one fails `helm install` by the schema, naming it."""
    transport = {"max_connection_age_s": 120, "max_connection_age_grace_s": 300, "keepalive_time_s": 30,
                 "keepalive_timeout_s": 10, "min_client_ping_interval_s": 5, "write_timeout_s": 60,
                 "max_concurrent_streams": 4096, "compression": "gzip"}
    r = helm.template([values_file(tmp_path, {"models": [JUDGE_MODEL], "gateway": {"server": {"transport": transport}},
                                              "annotator": {"server": {"transport": {"max_connection_age_s": None}}}})])
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert cfg.gateway.transport.model_dump() == transport
    assert cfg.annotator.transport.max_connection_age_s is None
    for n, (bad, word) in enumerate((({"max_connection_age_s": 0}, "max_connection_age_s"),
                                     ({"max_connection_age": 60}, "max_connection_age"),
                                     ({"max_concurrent_streams": "lots"}, "max_concurrent_streams"),
                                     ({"compression": "zstd"}, "compression"))):
        (tmp_path / str(n)).mkdir()   # renders are cached by the values file's path
        msg = rejected(helm, tmp_path / str(n), {"models": [JUDGE_MODEL], "gateway": {"server": {"transport": bad}}})
        assert word in msg, msg


@pytest.mark.parametrize("release", ["r1.2", "1moaa"])
def test_release_names_services_refuse_are_refused(helm, release):
    """Helm accepts them, the API server refuses the Services they would name (DNS-1035)."""
    with pytest.raises(HelmFailed) as err:
        helm.template([], {}, release=release)
    assert "which Services refuse (DNS-1035" in str(err.value)


def test_notes_name_the_recipe_the_gateway_answers(helm, tmp_path):
    """One recipe of the user's own and no defaultRecipe: the gateway answers that one, so the notes use it
    (they said "default", which the HTTP door answers 404)."""
    values = values_file(tmp_path, {"gateway": {"recipes": {"moa": {"proposers": [{"model": "qwen"}],
                                                                     "aggregator": {"model": "qwen"}}}}})
    notes = helm.notes([values])
    assert '"model": "moa"' in notes and 'model="moa"' in notes and '"default"' not in notes
