"""The chart on day 2: install notes, service account, ingress, upgrades, reproducible renders, labels.

Rendered by the real helm v4 binary; shares the value sets and helpers of test_chart.py."""
from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.fixtures.helm import CHART, K8S_VERSION, HelmFailed
from tests.test_chart import VALUE_SETS, render


def test_install_notes_follow_the_values(helm, tmp_path):
    """NOTES.txt: models with the roles they really have (modelDefaults merged in), and a LoadBalancer
    address that works on clouds that give a hostname (AWS) as well as an IP."""
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"modelDefaults": {"roles": ["judge"]}, "gateway": {"service": {"type": "LoadBalancer"}},
                                      "models": [{"name": "a", "model": "org/a", "roles": ["proposer", "aggregator"]},
                                                 {"name": "b", "model": "org/b"}]}))
    notes = helm.notes([values])
    assert "- a: org/a -> http://moaa-a:8000/v1  roles: proposer, aggregator\n" in notes
    assert "- b: org/b -> http://moaa-b:8000/v1  roles: judge\n" in notes
    (gateway,) = [x for x in notes.splitlines() if x.strip().startswith("export GATEWAY=")]
    assert "ingress[0].ip}" in gateway and "ingress[0].hostname}" in gateway


def test_service_account(helm):
    """serviceAccount: the chart's pods run under it (e.g. for workload identity to fetch weights);
    created with its annotations on request, an existing one named, or the namespace's default."""
    def accounts(r):
        return {d["metadata"]["name"]: d["spec"]["template"]["spec"].get("serviceAccountName")
                for d in r.of_kind("Deployment")}
    made = render(helm, "secure-chart-secrets")
    (sa,) = made.of_kind("ServiceAccount")
    assert sa["metadata"]["name"] == "moaa" and sa["automountServiceAccountToken"] is False
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}
    assert set(accounts(made).values()) == {"moaa"}
    named = helm.template([], {"serviceAccount.name": "weights-reader"})
    assert not named.of_kind("ServiceAccount") and set(accounts(named).values()) == {"weights-reader"}
    assert set(accounts(render(helm, "default")).values()) == {None}


def test_ingress_exposes_the_gateway_http_door(helm, tmp_path):
    """gateway.ingress: an Ingress to the OpenAI-compatible HTTP port of the gateway Service (gRPC stays on
    the Service: ingress controllers need their own settings for it); off by default."""
    r = render(helm, "secure-chart-secrets")
    (ing,) = r.of_kind("Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "moaa-www", "hosts": ["moaa.example.com"]}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "moaa.example.com"
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    svc = r.get("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]} and backend["port"]["name"] == "http"
    assert path["path"] == "/" and path["pathType"] == "Prefix"
    assert not render(helm, "default").of_kind("Ingress")
    (any_host,) = helm.template([], {"gateway.ingress.enabled": "true"}).of_kind("Ingress")
    (rule,) = any_host["spec"]["rules"]
    assert "host" not in rule and "tls" not in any_host["spec"]
    kubernetes_validate.validate(any_host, K8S_VERSION, strict=True)
    with pytest.raises(HelmFailed, match="gateway.ingress.enabled needs the HTTP door: gateway.httpPort is 0"):
        helm.template([], {"gateway.ingress.enabled": "true", "gateway.httpPort": "0"})


def test_upgrades_keep_selectors_and_roll_only_what_changed(helm, tmp_path):
    """`helm upgrade` to a newer chart keeps every selector (immutable in Deployments); a config change
    rolls the gateway and annotator (checksum/config) and leaves the GPU model pods alone."""
    import shutil

    newer = tmp_path / "moaa"
    shutil.copytree(CHART, newer)
    meta = yaml.safe_load((newer / "Chart.yaml").read_text())
    meta.update(version="9.9.9", appVersion="9.9.9")
    (newer / "Chart.yaml").write_text(yaml.safe_dump(meta))

    def selectors(objs):
        return {(o["kind"], o["metadata"]["name"]): o["spec"].get("selector") for o in objs
                if o["kind"] in ("Deployment", "Service")}
    old = render(helm, "multi-gpu").objects
    new = [o for o in yaml.safe_load_all(helm.run("template", "moaa", str(newer), "--namespace", "moaa",
                                                  *helm._value_args(*VALUE_SETS["multi-gpu"]))) if o]
    assert selectors(old) == selectors(new)
    for pvc in (o for o in old if o["kind"] == "PersistentVolumeClaim"):  # a PVC's spec is immutable too
        assert pvc["spec"] == next(o for o in new if o["metadata"]["name"] == pvc["metadata"]["name"])["spec"]

    def templates(r):
        return {d["metadata"]["name"]: d["spec"]["template"] for d in r.of_kind("Deployment")}
    before = templates(render(helm, "default"))
    after = templates(helm.template([], {"gateway.server.max_in_flight": "77"}))
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"moaa-gateway", "moaa-annotator"}
    assert all(before[n]["metadata"]["annotations"]["checksum/config"] != after[n]["metadata"]["annotations"]["checksum/config"]
               for n in changed)


def test_renders_are_reproducible(helm):
    """Two `helm template` runs give the same bytes once the token is given (GitOps diffs stay quiet);
    with the generated token, the Secret's token is the only difference."""
    args = ["template", "moaa", str(CHART), "--namespace", "moaa", "-f", str(CHART / "values-multi-gpu.yaml")]
    given = [*args, "--set", "auth.tokens[0]=" + "g" * 20]
    assert helm.run(*given) == helm.run(*given)
    one, two = (helm.run(*args).splitlines() for _ in range(2))
    differ = [(a, b) for a, b in zip(one, two) if a != b]
    assert len(one) == len(two) and len(differ) == 1 and differ[0][0].strip().startswith("tokens:")


def test_common_labels_reach_every_object_and_pod(helm):
    """commonLabels (cost centre, team) land on every object and every pod, where cost tools read them;
    the pods get no chart version label, so a chart upgrade alone does not restart GPU pods."""
    r = helm.template(["values-multi-gpu.yaml"], {"commonLabels.team": "ml", "modelDefaults.podLabels.team": "gpu",
                                                   "modelDefaults.podLabels.tier": "a"})
    for obj in r.objects:
        assert obj["metadata"]["labels"]["team"] == "ml", obj["metadata"]["name"]
    for d in r.of_kind("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        model = d["metadata"]["labels"]["app.kubernetes.io/component"] == "model"
        assert labels["team"] == ("gpu" if model else "ml"), d["metadata"]["name"]  # a model's own podLabels win
        assert ("tier" in labels) == model and "app.kubernetes.io/version" not in labels
        assert "team" not in d["spec"]["selector"]["matchLabels"]


def test_one_version_for_chart_images_and_trainer_jobs(helm):
    """The chart's moaa image, the Jobs' trainer image and the package are one release: a version bump
    that forgets one of them would run a trainer of another release than the gateway."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: tomli, the same parser (pytest's own dependency there)
        import tomli as tomllib

    from moaa.trainer.k8s import DEFAULT_IMAGE

    app = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    package = tomllib.loads((CHART.parents[1] / "pyproject.toml").read_text())["project"]["version"]
    gw = render(helm, "default").get("Deployment", "moaa-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gw["image"].rsplit(":", 1)[1] == DEFAULT_IMAGE.rsplit(":", 1)[1] == app == package


def test_deployments_with_several_replicas_get_a_disruption_budget(helm):
    """A node drain takes one pod of a multi-replica Deployment at a time (maxUnavailable 1, so a drain is
    never blocked for good); a single-replica Deployment gets none: a budget could only block the drain."""
    def budgets(r):
        return {p["metadata"]["name"]: p["spec"] for p in r.of_kind("PodDisruptionBudget")}
    assert budgets(helm.template()) == {}
    r = helm.template(["values-multi-gpu.yaml"])
    several = {d["metadata"]["name"]: d["spec"]["selector"] for d in r.of_kind("Deployment") if d["spec"]["replicas"] > 1}
    assert len(several) >= 3
    assert budgets(r) == {name: {"maxUnavailable": 1, "selector": sel} for name, sel in several.items()}
    for pdb in r.of_kind("PodDisruptionBudget"):
        kubernetes_validate.validate(pdb, K8S_VERSION, strict=True)
    assert budgets(helm.template(["values-multi-gpu.yaml"], {"podDisruptionBudget.enabled": "false"})) == {}


def test_what_uninstall_leaves_is_only_what_the_readme_says(helm):
    """`helm uninstall` deletes the release's objects but those marked keep (the PVCs: data, checkpoints,
    weights) and hook objects (a failed helm test pod, kept for its log); the chart README says so, with
    the commands that remove them."""
    r = render(helm, "secure-chart-secrets")
    kept = {(o["kind"], o["metadata"]["name"]) for o in r.objects
            if (o["metadata"].get("annotations") or {}).get("helm.sh/resource-policy") == "keep"}
    assert kept == {("PersistentVolumeClaim", f"moaa-{n}") for n in ("data", "checkpoints", "model-cache")}
    hooks = [o for o in r.objects if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]
    assert [(o["kind"], o["metadata"]["annotations"]["helm.sh/hook-delete-policy"]) for o in hooks] == [
        ("Pod", "before-hook-creation,hook-succeeded")]
    readme = (CHART / "README.md").read_text()
    section = readme.split("## Upgrade and uninstall", 1)[1].split("\n## ", 1)[0]
    assert "helm.sh/resource-policy: keep" in section
    assert "kubectl -n NAMESPACE delete pvc -l app.kubernetes.io/instance=RELEASE" in section
    assert "kubectl -n NAMESPACE delete pod -l app.kubernetes.io/instance=RELEASE,app.kubernetes.io/component=test" \
        in section
    (pod,) = hooks
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
