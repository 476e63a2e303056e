"""Write charts/moaa/values.schema.json: the chart's values, plus the moaa config models it passes through.

The chart's own keys are described below (every object closed with additionalProperties: false, so a
mistyped key fails `helm install` with a message naming it). Recipes, ensembles, backend tuning and
server settings are copied into the config file unchanged, so their schema is generated from the
config's pydantic models (moaa.services.config): what Helm accepts there, the gateway accepts too.

    python tools/gen_chart_schema.py           # rewrite the schema
    python tools/gen_chart_schema.py --check   # exit 1 when the file is stale
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "charts" / "moaa" / "values.schema.json"
ROLES = ["proposer", "aggregator", "judge", "target"]
QUANTITY = r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[mkMGTPE])?$"
NAME = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


# -- small builders: every value gets a description; objects are closed ---------------------------
def s(desc: str, **kw) -> dict:
    return {"type": "string", "description": desc, **kw}


def i(desc: str, **kw) -> dict:
    return {"type": "integer", "description": desc, **kw}


def num(desc: str, **kw) -> dict:
    return {"type": "number", "description": desc, **kw}


def b(desc: str) -> dict:
    return {"type": "boolean", "description": desc}


def arr(desc: str, items: dict, **kw) -> dict:
    return {"type": "array", "description": desc, "items": items, **kw}


def obj(desc: str, props: dict, required: list[str] | None = None) -> dict:
    out = {"type": "object", "description": desc, "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def strmap(desc: str) -> dict:
    return {"type": "object", "description": desc, "additionalProperties": {"type": "string"}}


def k8s(desc: str, type_: str = "object") -> dict:
    """A Kubernetes API object passed through as-is (the API server validates its fields)."""
    return {"type": type_, "description": desc}


def ref(name: str, desc: str) -> dict:
    return {"$ref": f"#/$defs/{name}", "description": desc}


def image(desc: str) -> dict:
    return obj(desc, {
        "repository": s("image repository"),
        "tag": s("image tag; empty: the chart's appVersion (moaa images) or the default tag"),
        "pullPolicy": s("Kubernetes imagePullPolicy", enum=["Always", "IfNotPresent", "Never"]),
    })


def placement() -> dict:
    return {
        "nodeSelector": strmap("node labels the pods must match; empty: the global nodeSelector"),
        "tolerations": arr("taints the pods tolerate; empty: the global tolerations", obj("a Toleration", {
            "key": s("taint key"),
            "operator": s("Exists or Equal", enum=["Exists", "Equal"]),
            "value": s("taint value"),
            "effect": s("taint effect", enum=["NoSchedule", "PreferNoSchedule", "NoExecute", ""]),
            "tolerationSeconds": i("how long a NoExecute taint is tolerated", minimum=0),
        })),
        "affinity": k8s("a Kubernetes Affinity object; empty: the global affinity"),
    }


def resources(desc: str) -> dict:
    qty = {"type": ["string", "number"], "description": "a quantity, e.g. 4, 500m, 16Gi"}
    return obj(desc, {
        "limits": {"type": "object", "description": "resource limits", "additionalProperties": qty},
        "requests": {"type": "object", "description": "resource requests", "additionalProperties": qty},
    })


def probe(desc: str) -> dict:
    return obj(desc, {
        "path": s("HTTP path probed on the vLLM port", pattern="^/"),
        "initialDelaySeconds": i("seconds before the first probe", minimum=0),
        "periodSeconds": i("seconds between probes", minimum=1),
        "timeoutSeconds": i("seconds before one probe times out", minimum=1),
        "failureThreshold": i("failed probes in a row before the container counts as failed", minimum=1),
    })


def env() -> dict:
    return arr("extra environment variables (Kubernetes EnvVar objects)",
               {"type": "object", "description": "an EnvVar", "required": ["name"]})


# -- the chart's values -------------------------------------------------------------------------
def model_settings() -> dict:
    return {
        "replicas": i("number of vLLM pods of this model (0 stops it, keeping its Service)", minimum=0),
        "gpus": i("GPUs per pod (nvidia.com/gpu); 0 runs on CPU", minimum=0),
        "roles": arr("what the model does in the MoAA recipe; derives the default recipe and ensemble",
                     {"type": "string", "enum": ROLES, "description": "one of " + ", ".join(ROLES)},
                     uniqueItems=True),
        "image": image("image override for this model (e.g. a vLLM CPU build); empty: images.vllm"),
        "servedModelName": s("name vLLM serves the model under and the gateway sends; empty: the model's name"),
        "vllm": obj("vLLM engine arguments", {
            "tensorParallelSize": i("--tensor-parallel-size; 0: the number of GPUs (at least 1)", minimum=0),
            "maxModelLen": i("--max-model-len, also the backend's context_window in the config", minimum=64),
            "dtype": s("--dtype", enum=["auto", "half", "float16", "bfloat16", "float", "float32"]),
            "gpuMemoryUtilization": num("--gpu-memory-utilization (only passed when gpus > 0)",
                                        exclusiveMinimum=0, maximum=1),
            "extraArgs": arr("more vllm serve arguments, e.g. --enforce-eager", {"type": "string", "description": "an argument"}),
        }),
        "env": env(),
        "resources": resources("CPU and memory requests and limits; nvidia.com/gpu is set from gpus"),
        "shmSize": s("size of the in-memory /dev/shm volume (tensor-parallel workers share memory)", pattern=QUANTITY),
        "nonRoot": b("run vLLM as uid 10001 with no capabilities, HOME and caches on an emptyDir; "
                     "default false: the official image runs as root"),
        "probes": obj("health probes of this model's pods", {
            "startup": probe("startup probe: allows periodSeconds x failureThreshold for download and load"),
            "readiness": probe("readiness probe: the Service sends traffic only to ready pods"),
            "liveness": probe("liveness probe: restarts a pod whose server stops answering"),
        }),
        "strategy": k8s("the Deployment's update strategy (a DeploymentStrategy); default: one pod at a time, "
                        "no surge pod, so rolling a GPU model needs no spare GPU"),
        "backend": ref("ModelBackend", "backend settings in the gateway's config (limits, timeouts, retries)"),
        "podAnnotations": strmap("annotations of this model's pods"),
        "podLabels": strmap("extra labels of this model's pods"),
        **placement(),
    }


def server(which: str, port: int) -> dict:
    what = {"gateway": "the MoA gateway (MoAGateway gRPC)", "annotator": "the annotator (Annotator gRPC)"}[which]
    props = {
        "enabled": b(f"deploy {what}"),
        "replicas": i("number of pods", minimum=0),
        "port": i(f"gRPC port (default {port})", minimum=1, maximum=65535),
        "metricsPort": i("Prometheus /metrics port", minimum=1, maximum=65535),
        "service": obj("the Service in front of the pods", {
            "type": s("Service type", enum=["ClusterIP", "NodePort", "LoadBalancer"]),
            "annotations": strmap("Service annotations (e.g. for a cloud load balancer)"),
            "headless": b(f"also a headless Service <release>-{which}-headless (gRPC port, every ready pod's "
                          f"address), for clients that balance over the pods themselves: dns:///<release>-{which}"
                          f"-headless:<port>"),
        }),
    }
    if which == "gateway":
        props |= {
            "recipes": {"type": "object", "description": "MoA recipes by name, as the config's recipes:; empty: "
                        "one recipe 'default' from the models' roles",
                        "additionalProperties": {"$ref": "#/$defs/RecipeConfig"}},
            "defaultRecipe": s("recipe used when a call names none (config default_recipe)"),
            "httpPort": i("OpenAI-compatible HTTP port (/v1/chat/completions; default 8080); 0 = off",
                          minimum=0, maximum=65535),
            "ingress": obj("an Ingress to the gateway's HTTP door (not gRPC)", {
                "enabled": b("make the Ingress (needs httpPort > 0)"),
                "className": s("ingressClassName; empty: the cluster's default class"),
                "annotations": strmap("Ingress annotations (controller settings)"),
                "hosts": arr("host names routed to the gateway; empty: every host",
                             {"type": "string", "description": "a host name"}),
                "tls": arr("TLS of the Ingress (IngressTLS objects: secretName, hosts)", k8s("an IngressTLS")),
            }),
            "extraBackends": {"type": "object", "description": "backends outside the chart (e.g. a hosted "
                              "OpenAI-compatible API), as the config's backends:",
                              "additionalProperties": {"$ref": "#/$defs/BackendConfig"}},
        }
    else:
        props |= {
            "ensembles": {"type": "object", "description": "judge ensembles by name, as the config's ensembles:; "
                          "empty: one pointwise ensemble 'default' of the judge-role models",
                          "additionalProperties": {"$ref": "#/$defs/EnsembleConfig"}},
            "defaultEnsemble": s("ensemble used when a call names none (config default_ensemble)"),
        }
    props |= {
        "server": ref("GatewaySettings" if which == "gateway" else "AnnotatorSettings",
                      f"more server settings of {what} in the config file"),
        "resources": resources("CPU and memory requests and limits"),
        "env": env(),
        "podAnnotations": strmap("pod annotations"),
        **placement(),
    }
    return obj(what, props)


def volume(desc: str, mount: str | None) -> dict:
    """A PVC value; `mount` describes mountPath (None: no chart pod mounts it, so no mountPath)."""
    return obj(desc, {
        "enabled": b("create (or use) a PersistentVolumeClaim; off: an emptyDir"),
        "existingClaim": s("use this existing PVC instead of creating one"),
        "size": s("requested size", pattern=QUANTITY),
        "storageClass": s("storage class; empty: the cluster default"),
        "accessModes": arr("access modes (ReadWriteMany lets pods on several nodes share it)",
                           {"type": "string", "description": "an access mode",
                            "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]},
                           minItems=1),
        **({"mountPath": s(mount, pattern="^/")} if mount else {}),
    })


def chart_schema() -> dict:
    settings = model_settings()
    model_item = obj("one model server", {
        "name": s("model name: Service <fullname>-<name>, backend name in the config", pattern=NAME, maxLength=40),
        "model": s("what vLLM loads: a hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or a path on the model cache volume",
                   minLength=1),
        **settings,
    }, required=["name", "model"])
    props = {
        "nameOverride": s("replaces the chart name in object names"),
        "fullnameOverride": s("replaces the whole object name prefix"),
        "commonLabels": strmap("labels added to every object and pod"),
        "images": obj("container images", {
            "vllm": image("the official vLLM OpenAI-compatible server image"),
            "moaa": image("the moaa image (docker/Dockerfile.gateway): gateway, annotator, helm test"),
        }),
        "imagePullSecrets": arr("Secrets for pulling private images", obj("a LocalObjectReference", {
            "name": s("Secret name")}, required=["name"])),
        "serviceAccount": obj("service account of the gateway, annotator and model pods (its token is not mounted)", {
            "create": b("make it; off: use name, or the namespace's default account"),
            "name": s("its name; empty with create: <fullname>"),
            "annotations": strmap("its annotations (e.g. a workload identity role)"),
        }),
        "hubToken": obj("Hugging Face token for gated models, passed to model pods as HF_TOKEN (training Jobs: "
                      "moaa train submit --hub-token-secret, default hf-token)", {
            "secretName": s("existing Secret holding the token; empty: no token"),
            "key": s("key of the token in that Secret"),
        }),
        "models": arr("model servers: one vLLM Deployment and Service each", model_item, minItems=1),
        "modelDefaults": obj("settings every model starts from; a model's own keys win", settings),
        "gateway": server("gateway", 50051),
        "annotator": server("annotator", 50052),
        "auth": obj("bearer-token authentication of gRPC calls", {
            "enabled": b("require a bearer token on gateway and annotator calls (default true)"),
            "existingSecret": s("existing Secret with the tokens; empty: the chart creates one from tokens"),
            "key": s("key in the Secret: a file with one token per line", pattern=r"^[-._a-zA-Z0-9]+$"),
            "tokens": arr("tokens for the chart-made Secret; empty: one generated token, kept across upgrades",
                          {"type": "string", "minLength": 16, "description": "a token (16 characters or more)"}),
        }),
        "tls": obj("TLS for the gRPC servers", {
            "enabled": b("serve the gateway over TLS"),
            "secretName": s("kubernetes.io/tls Secret (tls.crt, tls.key; ca.crt for mutual TLS)"),
            "mutual": b("require client certificates signed by ca.crt"),
            "annotator": b("serve the annotator over TLS too (for direct clients: the gateway's own annotate=true "
                           "calls to the annotator use plaintext)"),
        }),
        "podDisruptionBudget": obj("PodDisruptionBudgets of the Deployments with more than one replica", {
            "enabled": b("make them (a single-replica Deployment never gets one: it could only block a drain)"),
            "maxUnavailable": i("pods of one Deployment a drain may take at once", minimum=1),
        }),
        "persistence": obj("storage", {
            "data": volume("datasets (a release named moaa: the PVC moaa-data training Jobs mount at /data)",
                           "unused: no chart pod mounts this volume (training Jobs mount it at /data)"),
            "checkpoints": volume("training outputs and checkpoints (a release named moaa: the PVC moaa-checkpoints "
                                  "training Jobs write to and resume from)", None),
            "modelCache": volume("model weights cache (HF_HOME of the vLLM pods)",
                                 "where the vLLM pods mount it (HF_HOME is <mountPath>/hf)"),
        }),
        "metrics": obj("Prometheus", {
            "serviceMonitor": obj("a ServiceMonitor (prometheus-operator) for gateway, annotator and vLLM", {
                "enabled": b("create the ServiceMonitor (needs the prometheus-operator CRDs)"),
                "interval": s("scrape interval", pattern=r"^[0-9]+(ms|s|m|h)$"),
                "labels": strmap("labels the Prometheus instance selects ServiceMonitors by"),
            }),
        }),
        "networkPolicy": obj("NetworkPolicies", {
            "enabled": b("only the gateway, annotator and trainer pods may reach the model pods (default true)"),
            "extraModelIngress": arr("more peers allowed to reach model pods (NetworkPolicyPeer objects)",
                                     k8s("a NetworkPolicyPeer")),
            "clientIngress": arr("peers allowed to reach gateway and annotator; empty: everyone",
                                 k8s("a NetworkPolicyPeer")),
        }),
        **{k: dict(v, description=v["description"].replace("; empty: the global " + k, " (global default)"))
           for k, v in placement().items()},
        "tests": obj("the helm test pod", {
            "timeoutSeconds": i("deadline of its gRPC health check", minimum=1),
            "resources": resources("CPU and memory requests and limits of the test pod"),
        }),
    }
    return obj("values of the moaa chart", props)


# -- the config models, from pydantic -----------------------------------------------------------
def config_defs() -> dict:
    from moaa.services.config import BackendConfig, MoaaConfig

    defs = MoaaConfig.model_json_schema(ref_template="#/$defs/{model}")["$defs"]
    for name, d in defs.items():  # every value described: fall back to the field's title
        for field, p in d.get("properties", {}).items():
            p.setdefault("description", f"{p.get('title', field)} (moaa config {name}.{field})")
    assert "BackendConfig" in defs and BackendConfig
    backend = copy.deepcopy(defs["BackendConfig"])
    for key in ("urls", "served_model", "context_window"):  # the chart sets these from the model
        backend["properties"].pop(key)
    backend["required"] = []
    backend["title"] = "ModelBackend"
    defs["ModelBackend"] = {k: v for k, v in backend.items() if k != "required"}
    for source, title in (("GatewayConfig", "GatewaySettings"), ("AnnotatorConfig", "AnnotatorSettings")):
        server = copy.deepcopy(defs[source])
        for key in ("host", "port", "metrics_port", "tls", "auth", "http_port"):  # set from the chart's own values
            server["properties"].pop(key, None)
        server["title"] = title
        defs[title] = server
    return defs


def build() -> dict:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "moaa chart values"}
    schema |= chart_schema()
    schema["$defs"] = config_defs()
    return schema


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run python tools/gen_chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
