"""Job builder and k8s/ manifests: Kubernetes schema validation, client round-trip, manifests in step."""
from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from moaa.cli.main import build_parser, main
from moaa.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT
from moaa.trainer.config import TrainConfig, load_train_config
from moaa.trainer.k8s import JobSettings, build_job, from_dict, to_dict
from moaa.trainer.k8s_manifests import render
from moaa.trainer.launch import launch_command
from tests.fixtures.trainer import restricted_problems

ROOT = Path(__file__).resolve().parent.parent
K8S_VERSION = kubernetes_validate.utils.latest_version()
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) through the newest schemas shipped.
OLDEST = "1.27"
SUPPORTED = [v for v in sorted(set(kubernetes_validate.utils.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
             if tuple(map(int, v.split(".")[:2])) >= tuple(map(int, OLDEST.split(".")))]
KLASS = {"Job": "V1Job", "Namespace": "V1Namespace", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
         "ServiceAccount": "V1ServiceAccount", "Role": "V1Role", "RoleBinding": "V1RoleBinding"}


def assert_valid_and_round_trips(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert to_dict(from_dict(doc, KLASS[doc["kind"]])) == doc


def _cfg(kind="sft", **kw) -> TrainConfig:
    base = dict(model="/models/m", data="/data/d.jsonl", out="/checkpoints/run")
    return load_train_config(kind, None, **(base | kw))


SETTINGS = [
    JobSettings(),
    JobSettings(gpus=0, tolerations=[], hub_token_secret=None, name="cpu-run", namespace="ml"),
    JobSettings(gpus=8, launcher="accelerate", node_selector={"nvidia.com/gpu.product": "H100"},
                tolerations=[{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}],
                active_deadline_seconds=86400, backoff_limit=0),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "cpu", "8gpu"])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_every_job_validates_and_round_trips(kind, settings):
    cfg = _cfg(kind, lora={"enabled": True, "r": 8}, max_steps=100, trl={"max_grad_norm": 0.5})
    doc = to_dict(build_job(cfg, settings))
    assert_valid_and_round_trips(doc)
    pod = doc["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    rules = doc["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onPodConditions": [],
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [EXIT_BAD_INPUT]}}
    assert any(r["action"] == "Count" and r["onExitCodes"]["values"] == [EXIT_TRANSIENT] for r in rules)
    assert doc["spec"]["backoffLimit"] == settings.backoff_limit
    assert doc["spec"]["ttlSecondsAfterFinished"] == settings.ttl_seconds_after_finished
    c = pod["containers"][0]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/data", "/checkpoints", "/models", "/dev/shm"}
    if settings.gpus:
        assert c["resources"]["limits"]["nvidia.com/gpu"] == str(settings.gpus)
    else:
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
    if settings.gpus > 1:
        assert c["args"][-4:] == ["--nproc-per-node", str(settings.gpus), "--launcher", settings.launcher]
    env = {e["name"]: e for e in c["env"]}
    assert ("HF_TOKEN" in env) == bool(settings.hub_token_secret)


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "cpu", "8gpu"])
def test_job_pod_meets_the_restricted_pod_security_standard(settings):
    """A namespace that enforces the "restricted" Pod Security Standard admits the trainer pod."""
    pod = to_dict(build_job(_cfg(), settings))["spec"]["template"]["spec"]
    assert restricted_problems(pod) == []


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_job_command_parses_back_to_the_same_config(kind):
    """The pod runs exactly the config checked at submit time: its argv parses into an equal TrainConfig."""
    from moaa.cli.train import _config_from_args

    own = {"loss_type": ["sigmoid", "sft"]} if kind == "dpo" else {"packing": True}
    cfg = _cfg(kind, lora={"enabled": True, "r": 8}, learning_rate=3e-6, trl={"max_grad_norm": 0.5, "save_strategy": "no"},
               global_batch_size=32, per_device_batch_size=4, **own)
    c = to_dict(build_job(cfg, JobSettings(gpus=4)))["spec"]["template"]["spec"]["containers"][0]
    argv = c["command"][1:] + c["args"]
    args = build_parser().parse_args(argv)
    assert args.nproc_per_node == 4 and args.launcher == "torchrun"
    assert _config_from_args(kind, args) == cfg


def test_launch_command_runs_workers_with_the_resolved_config():
    cfg = _cfg("sft", max_steps=10)
    cmd = launch_command(cfg, 4, "torchrun")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:10] == ["-m", "moaa.cli.main", "train", "sft", "--data"] and "max_steps=10" in cmd
    assert "--num_processes" in launch_command(cfg, 2, "accelerate")


def test_k8s_manifests_validate_and_round_trip():
    files = sorted((ROOT / "k8s").rglob("*.yaml"))
    kinds = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert_valid_and_round_trips(doc)
            kinds.append(doc["kind"])
    assert {"Namespace", "PersistentVolumeClaim", "ServiceAccount", "Role", "RoleBinding", "Job"} <= set(kinds)


@pytest.mark.parametrize("version", SUPPORTED)
def test_jobs_and_manifests_meet_every_supported_schema(version):
    """The 1.27 and 1.28 schemas mark a podFailurePolicy rule's onPodConditions required (the Go field had no
    omitempty; the API server validates only len() > 0, so an exit-code rule carries onPodConditions: [])."""
    assert (ROOT / "charts" / "moaa" / "Chart.yaml").read_text().count(f'kubeVersion: ">={OLDEST}.0-0"') == 1
    docs = [to_dict(build_job(_cfg(kind), s)) for kind in ("sft", "dpo") for s in SETTINGS]
    docs += [d for p in sorted((ROOT / "k8s").rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    rules = docs[0]["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailJob", "Ignore", "Count"]  # the policy itself is unchanged
    assert all(bool(r.get("onExitCodes")) != bool(r["onPodConditions"]) for r in rules)


def test_k8s_manifests_are_in_step_with_the_builder():
    rendered = render()
    on_disk = {p.relative_to(ROOT / "k8s").as_posix(): p.read_text() for p in (ROOT / "k8s").rglob("*.yaml")}
    assert on_disk == rendered, "k8s/ drifted from the builder: run python -m moaa.trainer.k8s_manifests k8s/"
    # `kubectl apply -f k8s/` (not recursive) makes what the Jobs need, and starts no Job: DPO would fail at
    # once on the SFT model that does not exist yet
    assert not [n for n in rendered if "/" not in n and "Job" in {d["kind"] for d in yaml.safe_load_all(rendered[n])}]


def test_dry_run_prints_the_job(capsys, tmp_path):
    rc = main(["train", "submit", "dpo", "--data", "/data/p.jsonl", "--model", "/checkpoints/sft", "--out",
               "/checkpoints/dpo", "--gpus", "2", "--node-selector", "pool=a100", "--toleration", "gpu=yes:NoSchedule",
               "--beta", "0.05", "--dry-run"])
    assert rc == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert_valid_and_round_trips(doc)
    pod = doc["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"effect": "NoSchedule", "key": "gpu", "operator": "Equal", "value": "yes"}]
    assert "beta=0.05" in pod["containers"][0]["args"]


def test_bad_job_settings_exit_2(capsys):
    rc = main(["train", "submit", "sft", "--data", "d", "--model", "m", "--out", "o", "--gpus", "-1", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "bad job settings: gpus" in err and len(err.splitlines()) == 1


def test_job_settings_file_is_read_like_a_config_file(tmp_path, capsys):
    rc = main(["train", "submit", "sft", "--data", "d", "--model", "m", "--out", "o", "--dry-run",
               "--job-settings", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "job settings file" in err and "does not exist" in err


@pytest.mark.parametrize("out, why", [
    ("runs/sft", "relative"),
    ("/data/sft", "read-only data volume"),
    ("/tmp/sft", "not on the checkpoints volume"),
    ("/checkpointsX/sft", "not on the checkpoints volume"),
    ("/checkpoints/../tmp/sft", "not on the checkpoints volume"),
    ("/checkpoints", "not on the checkpoints volume"),  # the volume's root: a second run would mix with it
])
def test_output_off_the_checkpoints_volume_exits_2(capsys, out, why):
    """The pod's own filesystem dies with it: a model (and the checkpoints a retried pod resumes from)
    written anywhere but the checkpoints PVC would be lost, with the Job reported complete."""
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", out, "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"--out {out}" in err and why in err and "/checkpoints" in err


def test_checkpoints_mount_follows_the_settings(capsys, tmp_path):
    """Mounted where the output is (the pipeline's --out must be at the same path as in the Job)."""
    settings = tmp_path / "job.yaml"
    settings.write_text("checkpoints_path: /mnt/ckpt\n")
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", "/mnt/ckpt/run1",
               "--job-settings", str(settings), "--dry-run"])
    assert rc == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert_valid_and_round_trips(doc)
    mounts = {m["name"]: m["mountPath"] for m in doc["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert mounts["checkpoints"] == "/mnt/ckpt"


def test_private_registry_and_extra_env(capsys):
    """The trainer image lives in the user's (private) registry, as the chart's images do; and Jobs take
    extra environment variables (NCCL, experiment trackers) beside the ones the builder sets."""
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", "/checkpoints/r",
               "--image-pull-secret", "regcred", "--image-pull-secret", "other", "--env", "NCCL_DEBUG=INFO",
               "--env", "WANDB_MODE=offline", "--dry-run"])
    assert rc == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert_valid_and_round_trips(doc)
    pod = doc["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "other"}]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["WANDB_MODE"] == "offline" and env["HF_HOME"] == "/models/hf"
    # the builder's own variables cannot be overridden by accident
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", "/checkpoints/r",
               "--env", "HF_HOME=/tmp", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "HF_HOME" in err


@pytest.mark.parametrize("flags, settings, why", [
    (["--name", "Train_SFT"], "", "name: String should match pattern"),
    (["--name", "sft-" + "x" * 60], "", "name: String should have at most 63 characters"),
    (["--namespace", "ML Team"], "", "namespace: String should match pattern"),
    ([], "memory: 64GB RAM\n", "memory: String should match pattern"),
    (["--node-selector", "gpu type=h100"], "", "label key 'gpu type' is not a valid Kubernetes label key"),
    (["--toleration", "nvidia.com/gpu:Noschedule"], "", "--toleration 'nvidia.com/gpu:Noschedule': effect"),
    ([], "checkpoints_path: /models\n", "checkpoints_path /models overlaps the Job's /models volume"),
    (["--env", "MY VAR=1"], "", "'MY VAR' is no environment variable name"),
])
def test_what_the_api_server_would_refuse_exits_2_here(capsys, tmp_path, flags, settings, why):
    """Names, namespaces, quantities, label keys, taint effects and mount paths the API server refuses are
    refused by the builder (so by --dry-run and the pipeline's check before stage 1), in one line."""
    extra = []
    if settings:
        (tmp_path / "job.yaml").write_text(settings)
        extra = ["--job-settings", str(tmp_path / "job.yaml")]
    out = "/models/sft" if "checkpoints_path" in settings else "/checkpoints/sft"
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", out, "--dry-run",
               *flags, *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and why in err, err


@pytest.mark.parametrize("data, model, why", [
    ("sft.jsonl", "m", "--data sft.jsonl is relative: the Job's pod sees only its volumes"),
    ("/data/d.jsonl", "./mymodel", "--model ./mymodel is a path here"),
])
def test_paths_the_pod_cannot_see_exit_2(capsys, data, model, why):
    rc = main(["train", "submit", "sft", "--data", data, "--model", model, "--out", "/checkpoints/sft", "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and why in err, err
    assert main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "Qwen/Qwen2.5-0.5B", "--out",
                 "/checkpoints/sft", "--dry-run"]) == 0   # a hub id is fine: the pod downloads it


@pytest.mark.parametrize("url", ["not-a-url", "http://127.0.0.1:99999", "http://[::1"])
def test_a_malformed_api_server_url_is_bad_input(capsys, url):
    rc = main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", "/checkpoints/sft",
               "--api-server", url])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"--api-server {url!r}" in err, err


def test_a_gpu_count_that_does_not_divide_the_global_batch_exits_2_before_the_job(capsys):
    """Every worker of the pod would exit 2 on it (FailJob), after a 6-GPU node was found."""
    base = ["--data", "/data/d.jsonl", "--model", "m", "--out", "/checkpoints/sft"]
    assert main(["train", "submit", "sft", *base, "--gpus", "6", "--dry-run"]) == 2
    assert main(["train", "sft", *base, "--nproc-per-node", "6", "--check", "job"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("not a multiple of per_device_batch_size 1 x world size 6" in e for e in err)
    assert main(["train", "submit", "sft", *base, "--gpus", "4", "--dry-run"]) == 0


def test_one_output_folder_spelled_two_ways_is_one_job(capsys):
    names = []
    for out in ("/checkpoints/sft", "/checkpoints/sft/", "/checkpoints//sft"):
        assert main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", out, "--dry-run"]) == 0
        names.append(yaml.safe_load(capsys.readouterr().out)["metadata"]["name"])
    assert len(set(names)) == 1, names


@pytest.mark.parametrize("flag", [["--poll-interval", "-1"], ["--poll-interval", "nan"], ["--follow-timeout", "inf"],
                                  ["--follow-timeout", "-5"], ["--poll-interval", "0"]])
def test_follow_flags_are_checked_before_the_job_is_created(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "submit", "sft", "--data", "/data/d.jsonl", "--model", "m", "--out", "/checkpoints/sft",
              "--api-server", "http://127.0.0.1:9", *flag])
    assert exit_.value.code == 2 and "expected a positive number" in capsys.readouterr().err


def test_a_cpu_job_sees_no_gpu():
    """The trainer image sets NVIDIA_VISIBLE_DEVICES=all; a --gpus 0 Job overrides it (on runtimes that honour
    it, the pod would otherwise see every GPU of its node)."""
    env = lambda gpus: {e["name"]: e.get("value") for e in to_dict(build_job(_cfg(), JobSettings(gpus=gpus)))[
        "spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env(0)["NVIDIA_VISIBLE_DEVICES"] == "void" and "NVIDIA_VISIBLE_DEVICES" not in env(1)
