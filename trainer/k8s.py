"""Kubernetes Job builder for `moaa train sft|dpo` on GPU nodes (kubernetes client models).

The Job runs the trainer image's `moaa train KIND ...` with the resolved config as `--set` overrides
(config.cli_args, the one serialiser), so the pod runs exactly what was checked here. Exit codes drive
the podFailurePolicy: 2 (bad input) fails the Job at once, 75 (transient) and evictions are retried,
and a retried pod resumes from the newest checkpoint on the checkpoints volume. Several GPUs: the CLI itself starts torchrun/accelerate.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from pathlib import PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from moaa.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, UserError
from moaa.trainer.config import _Strict, cli_args, grad_accumulation

DEFAULT_IMAGE = "moaa/moaa-trainer:0.1.0"
CONTAINER = "trainer"
LABEL_APP = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"


# The API server's own rules (kubernetes-validate checks structure, not these formats): a refusal there
# would come after stage 1 of a pipeline, or only when a GPU node is free.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"                    # Job names (and their pods' job-name label)
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_OTHER_MOUNTS = ("/data", "/models", "/dev/shm")   # the Job's other volumes


def _label_problem(key: str, value: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if not name or len(name) > 63 or not _LABEL_NAME.match(name) or (
            prefix and (len(prefix) > 253 or not re.match(DNS_SUBDOMAIN, prefix))):
        return f"label key {key!r} is not a valid Kubernetes label key (prefix/name, name up to 63 of [-A-Za-z0-9_.])"
    if len(value) > 63 or not _LABEL_NAME.match(value):
        return f"label value {value!r} of {key!r} is not a valid Kubernetes label value (up to 63 of [-A-Za-z0-9_.])"
    return None


class Toleration(_Strict):
    key: str = Field(description="taint key, e.g. nvidia.com/gpu")
    operator: Literal["Exists", "Equal"] = Field("Exists", description="Exists, or Equal with a value")
    value: str | None = Field(None, description="taint value for operator Equal")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(None, description="taint effect")


class JobSettings(_Strict):
    """Where and how a training Job runs (not what it trains: that is TrainConfig)."""

    name: str | None = Field(None, max_length=63, pattern=DNS_LABEL,
                             description="Job name (lower-case letters, digits, '-'; up to 63); default "
                                         "moaa-KIND-<hash of the output folder>")
    namespace: str = Field("moaa", max_length=63, pattern=DNS_LABEL, description="namespace of the Job")
    image: str = Field(DEFAULT_IMAGE, description="trainer image (docker/Dockerfile.trainer)")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Secrets for a private registry")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables of the trainer")
    gpus: int = Field(1, ge=0, description="GPUs of one node; >1 starts one process per GPU")
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of the GPUs")
    cpu: str = Field("8", pattern=QUANTITY, description="CPU request (a Kubernetes quantity: 8, 500m)")
    memory: str = Field("64Gi", pattern=QUANTITY, description="memory request and limit (64Gi)")
    shm_size: str = Field("8Gi", pattern=QUANTITY, description="/dev/shm size (NCCL, data loader workers)")
    node_selector: dict[str, str] = Field(default_factory=dict, description="node labels the pod needs")
    tolerations: list[Toleration] = Field(default_factory=lambda: [Toleration(key="nvidia.com/gpu")],
                                          description="taints the pod tolerates (GPU nodes are often tainted)")
    data_claim: str = Field("moaa-data", description="PVC with datasets, mounted at /data")
    checkpoints_claim: str = Field("moaa-checkpoints", description="PVC for checkpoints and models")
    checkpoints_path: str = Field("/checkpoints", pattern="^/", description="where the checkpoints PVC is mounted; "
                                  "--out must be under it (the pipeline's --out: at the same path as where it runs)")
    model_cache_claim: str = Field("moaa-model-cache", description="PVC for downloaded weights (HF_HOME), at /models")
    hub_token_secret: str | None = Field("hf-token", description="Secret with the hub token (HF_TOKEN); optional")
    hub_token_key: str = Field("token", description="key of the token in that Secret")
    service_account: str = Field("moaa-trainer", description="service account of the pod")
    backoff_limit: int = Field(4, ge=0, description="retries of failed pods (bad input is never retried)")
    ttl_seconds_after_finished: int = Field(7 * 24 * 3600, ge=0, description="finished Jobs are deleted after this")
    active_deadline_seconds: int | None = Field(None, ge=1, description="upper bound on the whole Job")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="multi-GPU launcher")

    @model_validator(mode="after")
    def _api_server_rules(self) -> "JobSettings":
        for key, value in self.node_selector.items():
            problem = _label_problem(key, value)
            if problem:
                raise ValueError(f"node_selector: {problem}")
        bad = [n for n in self.env if not _ENV_NAME.match(n)]
        if bad:
            raise ValueError(f"env: {', '.join(map(repr, bad))} is no environment variable name")
        for claim in (self.data_claim, self.checkpoints_claim, self.model_cache_claim, *self.image_pull_secrets,
                      self.service_account, *([self.hub_token_secret] if self.hub_token_secret else [])):
            if len(claim) > 253 or not re.match(DNS_SUBDOMAIN, claim):
                raise ValueError(f"{claim!r} is not a valid Kubernetes object name (lower-case, digits, '-', '.')")
        path = PurePosixPath(posixpath.normpath(self.checkpoints_path))
        for other in _OTHER_MOUNTS:   # two volumes at one path: the API server refuses the Job
            if path == PurePosixPath(other) or path.is_relative_to(other) or PurePosixPath(other).is_relative_to(path):
                raise ValueError(f"checkpoints_path {self.checkpoints_path} overlaps the Job's {other} volume: "
                                 "choose another path (default /checkpoints)")
        return self


def job_name(kind: str, out: str, settings: JobSettings) -> str:
    """One output folder, one Job name: a second submit for the same folder conflicts instead of racing."""
    # normalised: /checkpoints/sft/ is the same folder, so the same Job (the second submit conflicts)
    return settings.name or f"moaa-{kind}-{hashlib.sha1(posixpath.normpath(out).encode()).hexdigest()[:8]}"


def check_output(out: str, s: JobSettings) -> None:
    """The pod's own filesystem dies with it: --out (the model, and the checkpoints a retried pod resumes
    from) must be on the checkpoints PVC, or the Job completes and its result is gone."""
    where = f"the checkpoints volume (PVC {s.checkpoints_claim} at {s.checkpoints_path})"
    path = PurePosixPath(posixpath.normpath(out))  # "/checkpoints/../tmp" is not on the volume
    if not path.is_absolute():
        problem = "is relative: in the pod it is on the container's own filesystem, not on " + where
    elif path.is_relative_to(s.checkpoints_path) and path != PurePosixPath(s.checkpoints_path):
        return
    elif path.is_relative_to("/data"):
        problem = f"is on the read-only data volume, not on {where}"
    else:
        problem = f"is not on {where}: the model and its checkpoints would be lost with the pod"
    raise UserError(f"--out {out} {problem}; use --out {s.checkpoints_path}/NAME")


def check_inputs(cfg) -> None:
    """A Job sees only its volumes: a relative --data or --model would be looked up in the image's working
    directory (a hub id for --model is fine: the pod downloads it)."""
    for flag, value in (("--data", cfg.data), ("--eval-data", getattr(cfg, "eval_data", None))):
        if value and not PurePosixPath(str(value)).is_absolute():
            raise UserError(f"{flag} {value} is relative: the Job's pod sees only its volumes; give the path "
                            "there, e.g. /data/NAME.jsonl")
    model = str(cfg.model)
    if model.startswith(("./", "../", "~")) or model in (".", "..") or (
            not model.startswith("/") and os.path.exists(model)):
        raise UserError(f"--model {model} is a path here: the Job's pod sees only its volumes; give the path "
                        "there (e.g. /checkpoints/sft or /models/NAME) or a hub id")


def build_job(cfg, settings: JobSettings | None = None):
    """A batch/v1 Job (kubernetes.client.V1Job) that runs this training config."""
    from kubernetes import client as k

    s = settings or JobSettings()
    check_output(str(cfg.out), s)
    check_inputs(cfg)
    grad_accumulation(cfg, max(1, s.gpus))   # every worker of the pod would exit 2 on it, FailJob
    name = job_name(cfg.kind, cfg.out, s)
    labels = {LABEL_APP: "moaa", LABEL_COMPONENT: "trainer", "moaa/stage": cfg.kind}
    command = ["moaa", "train", cfg.kind]
    args = cli_args(cfg)
    if s.gpus > 1:
        args += ["--nproc-per-node", str(s.gpus), "--launcher", s.launcher]
    gpus = {s.gpu_resource: str(s.gpus)} if s.gpus else {}
    env = [k.V1EnvVar(name="HF_HOME", value="/models/hf"),
           k.V1EnvVar(name="PYTHONUNBUFFERED", value="1"),
           k.V1EnvVar(name="MOAA_JOB_NAME", value=name)]
    if not s.gpus:   # the image says all; a CPU Job must not see a node's GPUs that the scheduler gave to others
        env.append(k.V1EnvVar(name="NVIDIA_VISIBLE_DEVICES", value="void"))
    taken = {e.name for e in env} | ({"HF_TOKEN"} if s.hub_token_secret else set())
    clash = sorted(taken & set(s.env))
    if clash:
        raise UserError(f"env {', '.join(clash)}: set by the Job builder itself; use its own setting instead")
    env += [k.V1EnvVar(name=key, value=value) for key, value in s.env.items()]
    if s.hub_token_secret:
        env.append(k.V1EnvVar(name="HF_TOKEN", value_from=k.V1EnvVarSource(secret_key_ref=k.V1SecretKeySelector(
            name=s.hub_token_secret, key=s.hub_token_key, optional=True))))
    container = k.V1Container(
        name=CONTAINER, image=s.image, image_pull_policy=s.image_pull_policy, command=command, args=args, env=env,
        # the "restricted" Pod Security Standard: nothing the trainer needs, and such namespaces admit it
        security_context=k.V1SecurityContext(allow_privilege_escalation=False,
                                             capabilities=k.V1Capabilities(drop=["ALL"])),
        resources=k.V1ResourceRequirements(requests={"cpu": s.cpu, "memory": s.memory, **gpus},
                                           limits={"memory": s.memory, **gpus}),
        volume_mounts=[k.V1VolumeMount(name="data", mount_path="/data", read_only=True),
                       k.V1VolumeMount(name="checkpoints", mount_path=s.checkpoints_path),
                       k.V1VolumeMount(name="model-cache", mount_path="/models"),
                       k.V1VolumeMount(name="shm", mount_path="/dev/shm")])
    claims = {"data": s.data_claim, "checkpoints": s.checkpoints_claim, "model-cache": s.model_cache_claim}
    volumes = [k.V1Volume(name=vol, persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(claim_name=claim))
               for vol, claim in claims.items()]
    volumes.append(k.V1Volume(name="shm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory", size_limit=s.shm_size)))
    pod = k.V1PodSpec(
        restart_policy="Never", service_account_name=s.service_account, automount_service_account_token=False,
        security_context=k.V1PodSecurityContext(fs_group=10001, run_as_user=10001, run_as_group=10001,
                                                run_as_non_root=True,
                                                seccomp_profile=k.V1SeccompProfile(type="RuntimeDefault")),
        node_selector=s.node_selector or None, containers=[container], volumes=volumes,
        image_pull_secrets=[k.V1LocalObjectReference(name=n) for n in s.image_pull_secrets] or None,
        tolerations=[k.V1Toleration(**t.model_dump(exclude_none=True)) for t in s.tolerations] or None)
    # An exit-code rule says onPodConditions: [] because the 1.27/1.28 OpenAPI schema marks it required (the
    # Go field had no omitempty); API servers only refuse a rule with both non-empty, so every version takes it.
    policy = k.V1PodFailurePolicy(rules=[
        # bad input: a retry cannot help
        k.V1PodFailurePolicyRule(action="FailJob", on_pod_conditions=[],
                                 on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(
                                     container_name=CONTAINER, operator="In", values=[EXIT_BAD_INPUT])),
        # preemption, eviction, node drain: retry without using up backoffLimit
        k.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            k.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
        # transient (EX_TEMPFAIL): retried, counted against backoffLimit
        k.V1PodFailurePolicyRule(action="Count", on_pod_conditions=[],
                                 on_exit_codes=k.V1PodFailurePolicyOnExitCodesRequirement(
                                     container_name=CONTAINER, operator="In", values=[EXIT_TRANSIENT])),
    ])
    spec = k.V1JobSpec(
        backoff_limit=s.backoff_limit, ttl_seconds_after_finished=s.ttl_seconds_after_finished,
        active_deadline_seconds=s.active_deadline_seconds, pod_failure_policy=policy,
        template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels), spec=pod))
    return k.V1Job(api_version="batch/v1", kind="Job",
                   metadata=k.V1ObjectMeta(name=name, namespace=s.namespace, labels=labels), spec=spec)


def to_dict(obj) -> dict[str, Any]:
    """The API's JSON form of a client model (what kubectl and the API server see)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def from_dict(data: dict[str, Any], klass: str):
    """Back into a client model through the client's own deserializer."""
    from kubernetes.client import ApiClient

    return ApiClient().deserialize(json.dumps(data), klass, "application/json")


def to_yaml(*objs) -> str:
    return "---\n".join(yaml.safe_dump(to_dict(o) if not isinstance(o, dict) else o, sort_keys=False) for o in objs)
