"""The Helm chart, rendered and linted by the real helm v4 binary, checked against the Kubernetes schemas
(kubernetes-validate) and against the gateway's own config model."""
from __future__ import annotations

import base64
from pathlib import PurePosixPath
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from moaa.services.config import dump_config, load_config, parse_config
from tests.fixtures.helm import CHART, K8S_VERSION, HelmFailed
from tests.fixtures.trainer import restricted_problems

# name -> (values files in charts/moaa, --set values)
VALUE_SETS = {
    "default": ([], {}),
    "cpu": (["values-cpu.yaml"], {}),
    "one-model-per-role": (["values-one-model-per-role.yaml"], {}),
    "multi-gpu": (["values-multi-gpu.yaml"], {"gateway.service.headless": "true", "annotator.service.headless": "true"}),
    "secure": (["values-secure.yaml"], {}),
    # chart-made auth Secret, TLS on the annotator too, every volume created by the chart
    "secure-chart-secrets": (["values-secure.yaml"], {
        "auth.existingSecret": "", "auth.tokens[0]": "t" * 32, "tls.annotator": "true",
        "persistence.data.enabled": "true", "persistence.modelCache.enabled": "true",
        "persistence.checkpoints.enabled": "true",
        "gateway.ingress.enabled": "true", "gateway.ingress.className": "nginx", "gateway.ingress.hosts[0]": "moaa.example.com",
        "gateway.ingress.tls[0].secretName": "moaa-www", "gateway.ingress.tls[0].hosts[0]": "moaa.example.com",
        "serviceAccount.create": "true", "serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn": "arn:x",
    }),
    # TLS to the annotator without client certificates: the gateway still needs the CA
    "secure-annotator-not-mutual": (["values-secure.yaml"], {"tls.mutual": "false", "tls.annotator": "true"}),
    # the vLLM pods as uid 10001 (modelDefaults.nonRoot), their caches redirected to writable volumes
    "non-root-models": (["values-one-model-per-role.yaml"], {"modelDefaults.nonRoot": "true"}),
}
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def grpc_host_port(target: str) -> tuple[str, str]:
    """A gRPC target's Service name and port: host:port, or a headless Service's dns:///host:port."""
    host, port = target.removeprefix("dns:///").rsplit(":", 1)
    return host, port


def render(helm, name, **kw):
    files, sets = VALUE_SETS[name]
    return helm.template(files, sets, **kw)


def model_services(r):
    return {s["metadata"]["name"]: s for s in r.of_kind("Service")
            if s["metadata"]["labels"]["app.kubernetes.io/component"] == "model"}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_finds_nothing(helm, name):
    files, sets = VALUE_SETS[name]
    out = helm.lint(files, sets)
    assert "0 chart(s) failed" in out
    for level in ("[INFO]", "[WARNING]", "[ERROR]"):
        assert level not in out, out


def min_kube_version() -> str:
    """The oldest Kubernetes the chart claims (Chart.yaml kubeVersion ">=X.Y.Z-0")."""
    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert claim.startswith(">=") and " " not in claim, claim
    return claim[2:].split("-")[0]


@pytest.mark.parametrize("kube", [min_kube_version(), K8S_VERSION])
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_object_validates_against_the_kubernetes_schemas(helm, name, kube):
    """Every Kubernetes version the chart claims: its oldest and the newest schemas that ship."""
    files, sets = VALUE_SETS[name]
    out = helm.run("template", "moaa", str(CHART), "--namespace", "moaa", "--kube-version", kube,
                   *helm._value_args(files, sets))
    objects = [o for o in yaml.safe_load_all(out) if o]
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            continue  # no schema ships for CRDs; test_service_monitor checks it by structure
        kubernetes_validate.validate(obj, kube, strict=True)
    older = f"1.{int(min_kube_version().split('.')[1]) - 1}.0"
    with pytest.raises(HelmFailed, match=f"incompatible with Kubernetes v{older}"):
        helm.run("template", "moaa", str(CHART), "--kube-version", older)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_config_loads_unchanged_in_the_gateway_config_model(helm, name, tmp_path):
    text = helm.template(*VALUE_SETS[name]).config_text()
    path = tmp_path / "moaa.yaml"
    path.write_text(text)
    cfg = load_config(path)  # what `moaa gateway serve --config` does
    raw = yaml.safe_load(text)
    # nothing dropped, renamed or coerced: the set fields are exactly the rendered ones
    assert cfg.model_dump(mode="json", exclude_unset=True) == raw
    assert parse_config(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("name", VALUE_SETS)
def test_backends_name_exactly_the_model_services(helm, name):
    r = render(helm, name)
    cfg = parse_config(yaml.safe_load(r.config_text()))
    services = model_services(r)
    deployments = {d["metadata"]["name"]: d for d in r.of_kind("Deployment")}
    hosts = set()
    for backend_name, backend in cfg.backends.items():
        (url,) = backend.urls
        parts = urlsplit(url)
        assert parts.scheme == "http" and parts.path == "/v1", url
        svc = services[parts.hostname]
        assert [p["port"] for p in svc["spec"]["ports"] if p["name"] == "http"] == [parts.port]
        hosts.add(parts.hostname)
        # the Service selects the model's pods, which serve the name the backend sends
        (dep,) = [d for d in deployments.values()
                  if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert f"--served-model-name={backend.served_model}" in container["args"]
        assert f"--max-model-len={backend.context_window}" in container["args"]
        assert {"name": "http", "containerPort": parts.port, "protocol": "TCP"} in container["ports"]
        assert backend_name == svc["metadata"]["labels"]["moaa/model"]
    assert hosts == set(services)


def test_names_follow_the_release(helm):
    r = helm.template([], {}, release="prod")
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert cfg.backends["qwen"].urls == ["http://prod-moaa-qwen:8000/v1"]
    assert set(model_services(r)) == {"prod-moaa-qwen"}
    assert cfg.annotator_address == "prod-moaa-annotator:50052"


def test_names_fit_63_characters_with_the_longest_release_name(helm):
    """Helm allows 53-character release names; every object name (a Service's is a DNS label) stays within 63,
    two long model names that share a prefix stay apart, and the config, the NOTES and the helm test pod
    name the same Services."""
    release = "r" * 53
    models = [{"name": "q" * 39 + "a", "model": "org/a", "roles": ["proposer", "aggregator", "judge"]},
              {"name": "q" * 39 + "b", "model": "org/b", "roles": ["proposer"]}]
    sets = {"persistence.data.enabled": "true", "persistence.checkpoints.enabled": "true",
            "persistence.modelCache.enabled": "true", "metrics.serviceMonitor.enabled": "true",
            "gateway.ingress.enabled": "true", "gateway.service.headless": "true",
            "annotator.service.headless": "true"}
    for i, m in enumerate(models):
        for k, v in m.items():
            sets[f"models[{i}].{k}"] = v if isinstance(v, str) else "{" + ",".join(v) + "}"
    r = helm.template([], sets, release=release)
    names = [(o["kind"], o["metadata"]["name"]) for o in r.objects]
    too_long = [n for n in names if len(n[1]) > 63]
    assert not too_long, too_long
    assert len(set(names)) == len(names)
    services = {s["metadata"]["name"] for s in r.of_kind("Service")}
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert {urlsplit(b.urls[0]).hostname for b in cfg.backends.values()} | {grpc_host_port(cfg.annotator_address)[0]} \
        <= services
    (test_pod,) = r.of_kind("Pod")
    assert any(e["value"].split(":")[0] in services for e in test_pod["spec"]["containers"][0]["env"]
               if e.get("value"))
    notes = helm.notes([], sets, release=release)
    gateway = next(s for s in services if s.endswith("-gateway"))
    assert f"svc/{gateway} " in notes and next(s for s in services if s.endswith("-annotator")) in notes
    (ingress,) = r.of_kind("Ingress")
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == gateway
    # short names are unchanged: a release named moaa makes the PVCs training Jobs mount by default
    short = helm.template([], {"persistence.data.enabled": "true"})
    assert ("PersistentVolumeClaim", "moaa-data") in [(o["kind"], o["metadata"]["name"]) for o in short.objects]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_servers_mount_what_the_config_names(helm, name):
    """--config, TLS and token files in the config exist in the gateway and annotator pods."""
    r = render(helm, name)
    cfg = parse_config(yaml.safe_load(r.config_text()))
    for which, server in (("gateway", cfg.gateway), ("annotator", cfg.annotator)):
        dep = r.get("Deployment", f"moaa-{which}")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        files = {}
        for m in c["volumeMounts"]:
            vol = volumes[m["name"]]
            src = vol.get("secret") or vol.get("configMap")
            for item in (src or {}).get("items", []):
                files[f"{m['mountPath']}/{item['path']}"] = item["key"]
            if vol.get("configMap"):
                cm = r.get("ConfigMap", vol["configMap"]["name"])
                files.update({f"{m['mountPath']}/{k}": k for k in cm["data"]})
        assert c["command"][:3] == ["moaa", which, "serve"]
        assert files[c["command"][c["command"].index("--config") + 1]] == "moaa.yaml"
        wanted = [server.tls.cert_file, server.tls.key_file, server.tls.client_ca_file, server.auth.tokens_file]
        if which == "gateway" and cfg.annotator_tls.on:   # the gateway's files as the annotator's client
            wanted += [cfg.annotator_tls.ca_file, cfg.annotator_tls.cert_file, cfg.annotator_tls.key_file]
        for f in filter(None, wanted):
            assert f in files, f"{which}: config names {f}, pods mount {sorted(files)}"
        assert server.host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        http = {"http": server.http_port} if getattr(server, "http_port", None) else {}
        assert ports == {"grpc": server.port, "metrics": server.metrics_port, **http}
        svc = r.get("Service", f"moaa-{which}")
        assert selects(svc["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])
    if cfg.annotator_address:
        host, port = grpc_host_port(cfg.annotator_address)
        assert [p["port"] for p in r.get("Service", host)["spec"]["ports"] if p["name"] == "grpc"] == [int(port)]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_model_pods_have_probes_and_shared_memory(helm, name):
    for dep in model_deployments(render(helm, name)):
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        startup = c["startupProbe"]
        # loading weights takes minutes: the startup probe must allow at least 5 of them
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
        (shm,) = [v for v in pod["volumes"] if v["name"] == "shm"]
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert c["image"].startswith(("vllm/vllm-openai:", "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:"))
        # the official image runs as root (unless nonRoot); never with privilege escalation
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["command"] == ["vllm", "serve"]


def pod_specs(r) -> dict[str, dict]:
    """Every pod the chart runs: Deployments' templates and the helm test pod."""
    pods = {f"Deployment/{d['metadata']['name']}": d["spec"]["template"]["spec"] for d in r.of_kind("Deployment")}
    return pods | {f"Pod/{p['metadata']['name']}": p["spec"] for p in r.of_kind("Pod")}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_container_requests_cpu_and_memory(helm, name):
    """The scheduler places pods by their requests: without them a node is overcommitted and the pods are
    the first evicted (BestEffort)."""
    for where, pod in pod_specs(render(helm, name)).items():
        for c in pod["containers"]:
            res = c.get("resources", {})
            assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{where}/{c['name']}: {res}"


@pytest.mark.parametrize("name", VALUE_SETS)
def test_moaa_pods_meet_the_restricted_pod_security_standard(helm, name):
    """Gateway, annotator and the helm test pod (the moaa image runs as uid 10001). The vLLM pods run the
    official image as root: they are not held to it."""
    for where, pod in pod_specs(render(helm, name)).items():
        if pod["containers"][0]["name"] != "vllm":
            assert restricted_problems(pod) == [], where


def test_model_pods_run_as_root_unless_non_root_is_chosen(helm):
    """Default: root, as the official image expects (no USER; caches under /root). modelDefaults.nonRoot: uid
    10001, no capabilities, and every cache the image writes under $HOME (vLLM, Triton, torch inductor,
    FlashInfer's JIT, XDG) or HF_HOME on a volume the pod can write (fsGroup), USER set for getpass."""
    for dep in model_deployments(render(helm, "default")):
        pod = dep["spec"]["template"]["spec"]
        assert "securityContext" not in pod and pod["containers"][0]["securityContext"] == {
            "allowPrivilegeEscalation": False}
    deps = model_deployments(render(helm, "non-root-models"))
    assert len(deps) > 1
    for dep in deps:
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                          "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch"}
        (c,) = pod["containers"]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        # all of the restricted standard but seccomp: RuntimeDefault refuses the NUMA calls of vLLM's CPU backend
        assert restricted_problems(pod) == ["vllm: no RuntimeDefault seccomp profile"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v}
        for var in ("HOME", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR",
                    "FLASHINFER_WORKSPACE_BASE", "HF_HOME"):
            under = [m for m in mounts if PurePosixPath(env[var]).is_relative_to(m)]
            assert under and mounts[under[0]] in writable, f"{var}={env[var]} is on no writable volume"
        assert env["USER"] == "vllm"


def model_deployments(r):
    return [d for d in r.of_kind("Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == "model"]


def test_probes_are_set_per_model(helm):
    r = render(helm, "one-model-per-role")
    thresholds = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["failureThreshold"]
                  for d in model_deployments(r)}
    assert thresholds["moaa-target"] == 30 and thresholds["moaa-qwen-7b"] == 90


def test_replicas_gpus_and_tensor_parallelism(helm):
    r = render(helm, "multi-gpu")
    seen = {}
    for dep in model_deployments(r):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        gpus = c["resources"]["limits"]["nvidia.com/gpu"]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert f"--tensor-parallel-size={gpus}" in c["args"]
        seen[dep["metadata"]["name"]] = (dep["spec"]["replicas"], gpus)
        # rolling a GPU model must not need a spare GPU for a surge pod
        assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
        pod = dep["spec"]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert seen == {"moaa-qwen-72b": (2, 4), "moaa-llama-70b": (2, 4), "moaa-gemma-27b": (3, 2), "moaa-target": (4, 1)}


def test_cpu_models_ask_for_no_gpu(helm):
    for dep in model_deployments(render(helm, "cpu")):
        (c,) = dep["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert not any(a.startswith("--gpu-memory-utilization") for a in c["args"])
        assert "--tensor-parallel-size=1" in c["args"]
        assert {"name": "VLLM_CPU_KVCACHE_SPACE", "value": "2"} in c["env"]


def test_defaults_are_minimal(helm):
    r = render(helm, "default")
    kinds = sorted(o["kind"] for o in r.objects)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "Pod",
                     "Secret", "Service", "Service", "Service"]
    cfg = parse_config(yaml.safe_load(r.config_text()))
    # one model in every role: the derived recipe and ensemble use it
    assert [a.model for a in cfg.recipes["default"].proposers] == ["qwen"]
    assert cfg.recipes["default"].aggregator.model == "qwen"
    assert [j.model for j in cfg.ensembles["default"].judges] == ["qwen"]


def test_default_install_is_closed(helm):
    """Auth on with a generated token, NetworkPolicies on; TLS stays opt-in (it needs a certificate)."""
    r = render(helm, "default")
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert cfg.gateway.auth.tokens_file == cfg.annotator.auth.tokens_file == "/etc/moaa/auth/tokens"
    assert not cfg.gateway.tls.enabled
    (secret,) = r.of_kind("Secret")
    assert secret["metadata"]["name"] == "moaa-auth"
    token = secret["stringData"]["tokens"]
    assert len(token) == 41 and token.endswith("\n") and token[:-1].isalnum()
    assert {p["metadata"]["name"] for p in r.of_kind("NetworkPolicy")} == {"moaa-models", "moaa-servers"}
    # turned off on request, and a listed token replaces the generated one
    off = render_sets(helm, {"auth.enabled": "false", "networkPolicy.enabled": "false"})
    assert not off.of_kind("Secret") and not off.of_kind("NetworkPolicy")
    assert parse_config(yaml.safe_load(off.config_text())).gateway.auth.tokens_file is None
    mine = render_sets(helm, {"auth.tokens[0]": "u" * 20})
    assert mine.of_kind("Secret")[0]["stringData"]["tokens"] == "u" * 20 + "\n"


def render_sets(helm, sets: dict[str, str]):
    return helm.template([], sets)


def test_generated_token_is_kept_across_upgrades(helm, helm_cluster):
    """`helm template --dry-run=server` against an emulated API server runs the chart's real `lookup`."""
    first = helm.template(cluster=helm_cluster).of_kind("Secret")[0]["stringData"]["tokens"]
    again = helm.template(cluster=helm_cluster).of_kind("Secret")[0]["stringData"]["tokens"]
    assert first != again  # nothing installed yet: every render generates a fresh one
    helm_cluster.put({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                      "metadata": {"name": "moaa-auth", "namespace": "moaa"},
                      "data": {"tokens": base64.b64encode(first.encode()).decode()}})
    for _ in range(2):  # upgrades keep the installed token
        assert helm.template(cluster=helm_cluster).of_kind("Secret")[0]["stringData"]["tokens"] == first
    # listing tokens replaces it
    listed = helm.template([], {"auth.tokens[0]": "v" * 20}, cluster=helm_cluster)
    assert listed.of_kind("Secret")[0]["stringData"]["tokens"] == "v" * 20 + "\n"


def trainer_pod_labels() -> dict:
    """Labels of the trainer pods `moaa train submit` makes (trainer/k8s.py); the chart has no Job."""
    from moaa.trainer.config import load_train_config
    from moaa.trainer.k8s import build_job, to_dict

    cfg = load_train_config("sft", None, model="/models/m", data="/data/d.jsonl", out="/checkpoints/run")
    return to_dict(build_job(cfg))["spec"]["template"]["metadata"]["labels"]


def test_network_policy_lets_only_gateway_annotator_and_trainer_reach_models(helm):
    for name in ("default", "secure"):
        r = render(helm, name)
        pods = {d["metadata"]["labels"]["app.kubernetes.io/component"] + "/" + d["metadata"]["name"]:
                d["spec"]["template"]["metadata"]["labels"] for d in r.of_kind("Deployment")}
        pol = r.get("NetworkPolicy", "moaa-models")
        selector = pol["spec"]["podSelector"]["matchLabels"]
        protected = {k for k, labels in pods.items() if selects(selector, labels)}
        assert protected == {k for k in pods if k.startswith("model/")}
        (rule,) = pol["spec"]["ingress"]
        assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
        pod_peers = [p["podSelector"]["matchLabels"] for p in rule["from"] if "podSelector" in p]
        allowed = {k for k, labels in pods.items() if any(selects(s, labels) for s in pod_peers)}
        assert allowed == {"gateway/moaa-gateway", "annotator/moaa-annotator"}
        trainer = trainer_pod_labels()
        assert any(selects(s, trainer) for s in pod_peers)
        test_pod = r.of_kind("Pod")[0]["metadata"]["labels"]
        assert not any(selects(s, test_pod) for s in pod_peers)  # nor any other pod
        # and every peer admits some pod that exists: no selector left for pods nothing makes
        for peer in pod_peers:
            assert any(selects(peer, labels) for labels in [*pods.values(), trainer]), peer
        others = [p for p in rule["from"] if "podSelector" not in p]
        if name == "default":
            assert others == [] and r.get("NetworkPolicy", "moaa-servers")["spec"]["ingress"] == [{}]
            continue
        assert others == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        # the servers' policy still lets the gateway call the annotator and the helm test pod check the gateway
        servers = r.get("NetworkPolicy", "moaa-servers")["spec"]["ingress"][0]["from"]
        assert any(selects(p["podSelector"]["matchLabels"], test_pod) for p in servers if "podSelector" in p)
        assert any(selects(p["podSelector"]["matchLabels"], pods["gateway/moaa-gateway"]) for p in servers
                   if "podSelector" in p)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_servers_drain_before_they_stop(helm, name):
    """A rolling update (every config change rolls them) loses no calls: the pod keeps serving while the
    Service's endpoints drop it (preStop sleep), then gets its shutdown grace on top."""
    r = render(helm, name)
    cfg = parse_config(yaml.safe_load(r.config_text()))
    for which, server in (("gateway", cfg.gateway), ("annotator", cfg.annotator)):
        pod = r.get("Deployment", f"moaa-{which}")["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        sleep = c["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and int(sleep[1]) >= 5
        assert pod["terminationGracePeriodSeconds"] >= int(sleep[1]) + server.shutdown_grace_s


def test_tls_switches_kubelet_probes_to_tcp(helm):
    gw = render(helm, "secure").get("Deployment", "moaa-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gw["readinessProbe"]["tcpSocket"] == {"port": "grpc"}
    plain = render(helm, "default").get("Deployment", "moaa-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert plain["readinessProbe"]["grpc"] == {"port": 50051}


def test_service_monitor(helm):
    """Prometheus scrapes exactly the metrics endpoints: the gateway's and the annotator's metrics port
    and vLLM's /metrics on each model's http port, never the gateway's OpenAI door (also a port named
    http, where /metrics is a 401 or 404 and the target would show down)."""
    r = render(helm, "multi-gpu")
    monitors = r.of_kind("ServiceMonitor")
    scraped = set()
    for sm in monitors:
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert all(set(e) <= {"port", "path", "interval"} and e["interval"] == "15s" for e in sm["spec"]["endpoints"])
        for s in r.of_kind("Service"):
            if match_selector(sm["spec"]["selector"], s["metadata"]["labels"]):
                scraped |= {(s["metadata"]["name"], p["name"], e.get("path", "/metrics")) for p in s["spec"]["ports"]
                            for e in sm["spec"]["endpoints"] if e["port"] == p["name"]}
    models = set(model_services(r))
    assert models and scraped == {("moaa-gateway", "metrics", "/metrics"), ("moaa-annotator", "metrics", "/metrics"),
                                  *((m, "http", "/metrics") for m in models)}
    assert not render(helm, "default").of_kind("ServiceMonitor")


def test_headless_services_list_the_pods_for_client_side_balancing(helm):
    """service.headless: a second, headless Service per server (gRPC port only) beside the ClusterIP one, with
    the same selector; off by default. Having no metrics port, it adds no scrape target (test above)."""
    r = render(helm, "multi-gpu")
    for which in ("gateway", "annotator"):
        main, headless = r.get("Service", f"moaa-{which}"), r.get("Service", f"moaa-{which}-headless")
        assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == main["spec"]["selector"]
        assert [(p["name"], p["port"], p["appProtocol"]) for p in headless["spec"]["ports"]] == \
            [(p["name"], p["port"], p["appProtocol"]) for p in main["spec"]["ports"] if p["name"] == "grpc"]
    assert not [s for s in render(helm, "default").of_kind("Service") if s["metadata"]["name"].endswith("-headless")]
    # the gateway's own channel to the annotator spreads its calls over the annotator pods too; with TLS the
    # certificate is checked against the annotator Service's name, which the certificate holds
    assert parse_config(yaml.safe_load(r.config_text())).annotator_address == "dns:///moaa-annotator-headless:50052"
    assert parse_config(yaml.safe_load(render(helm, "default").config_text())).annotator_address == "moaa-annotator:50052"
    secure = helm.template(["values-secure.yaml"], {"annotator.service.headless": "true", "tls.annotator": "true"})
    tls = parse_config(yaml.safe_load(secure.config_text())).annotator_tls
    assert tls.server_name == "moaa-annotator" and tls.ca_file == "/etc/moaa/tls/ca.crt"
    notes = helm.notes(*VALUE_SETS["multi-gpu"])
    assert "dns:///moaa-gateway-headless.moaa.svc:50051" in notes


def match_selector(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and matchExpressions In/NotIn/Exists) against an object's labels."""
    ops = {"In": lambda k, vs: labels.get(k) in vs, "NotIn": lambda k, vs: labels.get(k) not in vs,
           "Exists": lambda k, vs: k in labels, "DoesNotExist": lambda k, vs: k not in labels}
    return selects(selector.get("matchLabels", {}), labels) and all(
        ops[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def test_training_jobs_are_not_a_chart_copy(helm):
    """The trainer Job has one definition, trainer/k8s.py build_job (moaa train submit, k8s/): the chart
    renders no Job in any values file and refuses the old `trainer:` values instead of ignoring them."""
    for name in VALUE_SETS:
        assert not render(helm, name).of_kind("Job"), name
    assert not (CHART / "templates" / "trainer-job.yaml").exists()
    with pytest.raises(HelmFailed, match="additional properties 'trainer' not allowed"):
        helm.run("template", "moaa", str(CHART), "--set", "trainer.sft.enabled=true")


def test_chart_storage_is_what_training_jobs_mount(helm):
    """A release named moaa with storage on makes every PVC a default `moaa train submit` Job mounts
    (data, checkpoints, model cache): nothing else to apply, no Job Pending on a missing claim."""
    from moaa.trainer.k8s import JobSettings, build_job, to_dict
    from moaa.trainer.config import load_train_config

    cfg = load_train_config("sft", None, model="/models/m", data="/data/d.jsonl", out="/checkpoints/run")
    pod = to_dict(build_job(cfg, JobSettings()))["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    for name in ("multi-gpu", "secure-chart-secrets"):
        pvcs = {p["metadata"]["name"]: p for p in render(helm, name).of_kind("PersistentVolumeClaim")}
        assert claims <= set(pvcs), f"{name}: Jobs mount {sorted(claims)}, the chart makes {sorted(pvcs)}"
    # the model cache is one HF_HOME: what the vLLM pods downloaded, the Jobs find (and the other way round)
    def hf_home(pod, claim):
        (c,) = pod["containers"]
        vol = next(v["name"] for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == vol)
        home = next(e["value"] for e in c["env"] if e["name"] == "HF_HOME")
        return str(PurePosixPath(home).relative_to(mount))
    vllm = next(d for d in render(helm, "multi-gpu").of_kind("Deployment")
                if d["metadata"]["labels"]["app.kubernetes.io/component"] == "model")["spec"]["template"]["spec"]
    assert hf_home(vllm, "moaa-model-cache") == hf_home(pod, "moaa-model-cache")
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    vllm_env = {e["name"]: e for e in vllm["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == vllm_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    mine = helm.template([], {"persistence.checkpoints.enabled": "true", "persistence.checkpoints.existingClaim": "c",
                              "persistence.checkpoints.storageClass": "fast"})
    assert not mine.of_kind("PersistentVolumeClaim")  # an existing claim is used, not made


def test_helm_test_pod_targets_the_gateway(helm):
    for name in ("default", "secure"):
        r = render(helm, name)
        (pod,) = r.of_kind("Pod")
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        svc = r.get("Service", "moaa-gateway")
        assert env["MOAA_TARGET"] == f"moaa-gateway:{svc['spec']['ports'][0]['port']}"
        assert ("MOAA_TLS_DIR" in env) == (name == "secure")
        assert "MOAA_TOKEN_FILE" in env  # auth is on by default


def test_chart_made_auth_secret_holds_the_tokens(helm):
    r = render(helm, "secure-chart-secrets")
    (secret,) = r.of_kind("Secret")
    assert secret["stringData"]["tokens"] == "t" * 32 + "\n"
    cfg = parse_config(yaml.safe_load(r.config_text()))
    assert cfg.annotator.tls.enabled and cfg.gateway.tls.client_ca_file
    # the gateway reaches the TLS annotator trusting the Secret's CA, presenting its certificate (mutual)
    assert cfg.annotator_tls.ca_file == "/etc/moaa/tls/ca.crt" and cfg.annotator_tls.cert_file == "/etc/moaa/tls/tls.crt"


def test_packaged_chart_renders_the_same(helm, tmp_path):
    """`helm package` keeps everything templates read (files/, the schema): the archive renders alike."""
    helm.run("package", str(CHART), "--destination", str(tmp_path))
    (archive,) = tmp_path.glob("moaa-*.tgz")
    out = helm.run("template", "moaa", str(archive), "--namespace", "moaa", "-f", str(CHART / "values-secure.yaml"))
    packaged = [o for o in yaml.safe_load_all(out) if o]
    assert packaged == render(helm, "secure").objects
    with pytest.raises(HelmFailed, match="at '/models/0/name': got null, want string"):
        helm.run("template", "moaa", str(archive), "--set", "models[0].name=null")
