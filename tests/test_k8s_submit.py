"""`moaa train submit` against an EMULATED Kubernetes API server (kmock over real HTTP on 127.0.0.1).

There is no real cluster here: the emulator stores objects like an API server, and the tests play the
Job controller (they create the pod, its log and the Job's status) while the real CLI follows the Job.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import yaml

from moaa.cli.main import main
from moaa.trainer.k8s import to_dict
from tests.fixtures.trainer import PodLog, sft_rows, write_jsonl

NS = "moaa"
JOB_ARGS = ["--data", "/data/sft.jsonl", "--model", "/models/m", "--out", "/checkpoints/sft", "--name", "run1",
            "--max-steps", "4"]
LOG = "\n".join(json.dumps({"event": "log", "step": s, "total": 4, "loss": 2.0 - s / 10, "eta_s": 4 - s})
                for s in range(1, 5)) + "\n"


CONTROLLER = "moaa-test-job-controller"


def play_controller(emu, *, exit_code: int, log: str = LOG, reason: str | None = None, timeout: float = 30,
                    killed: str | None = None):
    """In a thread: wait for the Job, add its pod (terminated with exit_code) and log, then set its status."""
    from kubernetes import client

    api = emu.client()
    api.user_agent = CONTROLLER  # tells its requests from those of `moaa train submit`
    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not batch.list_namespaced_job(NS).items:
            time.sleep(0.05)
        job = batch.list_namespaced_job(NS).items[0]
        name = job.metadata.name
        pod = f"{name}-x1"
        emu.serve_log(NS, pod, PodLog(log))
        core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": pod, "namespace": NS, "labels": {"job-name": name}},
            "spec": {"containers": [{"name": "trainer", "image": "x"}], "restartPolicy": "Never"},
            "status": {"phase": "Succeeded" if exit_code == 0 else "Failed", "containerStatuses": [{
                "name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, **({"reason": killed} if killed else {})}}}]}})
        time.sleep(0.3)  # let the follower see the job running first
        cond = {"type": "Complete" if exit_code == 0 else "Failed", "status": "True"}
        if reason:
            cond.update(reason=reason, message=f"{reason} happened")
        batch.patch_namespaced_job_status(name, NS, {"status": {
            "succeeded": int(exit_code == 0), "failed": int(exit_code != 0), "conditions": [cond]}})

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def submit(emu, *extra):
    return main(["train", "submit", "sft", *JOB_ARGS, "--api-server", emu.url, "--poll-interval", "0.1",
                 "--follow-timeout", "30", *extra])


def stored_job(emu):
    from kubernetes import client

    return client.BatchV1Api(emu.client()).read_namespaced_job("run1", NS)


def test_submit_follows_logs_and_succeeds(kube_api, capsys):
    ctl = play_controller(kube_api, exit_code=0)
    rc = submit(kube_api)
    ctl.join(5)
    out = capsys.readouterr().out
    assert rc == 0
    events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert events[0]["event"] == "job_created" and events[0]["name"] == "run1"
    assert [e["step"] for e in events if e["event"] == "log"] == [1, 2, 3, 4]  # the pod's progress, once each
    assert events[-1] == {"event": "job_complete", "name": "run1"}
    # what the API server stored is what --dry-run prints
    assert main(["train", "submit", "sft", *JOB_ARGS, "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    stored = to_dict(stored_job(kube_api))
    assert stored["spec"] == printed["spec"]


def test_submit_needs_only_what_the_submitter_role_grants(kube_api, capsys):
    """Every API request of a submit that creates, follows (status, pods, logs) and finishes a Job is
    allowed by the Role of k8s/20-rbac.yaml: a user bound to it is not stopped by a 403 half way."""
    from pathlib import Path

    docs = yaml.safe_load_all((Path(__file__).resolve().parents[1] / "k8s" / "20-rbac.yaml").read_text())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    ctl = play_controller(kube_api, exit_code=0)
    assert submit(kube_api) == 0
    ctl.join(5)
    verbs = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "UPDATE": "update",
             "PATCH": "patch", "DELETE": "delete"}  # kmock's names of the request verbs
    made = {(r.resource.group, r.resource.plural + (f"/{r.subresource}" if r.subresource else ""),
             verbs[r.action.value]) for r in list(kube_api.kmock)
            if r.headers.get("User-Agent") != CONTROLLER and r.resource}
    assert ("batch", "jobs", "create") in made
    for group, resource, verb in sorted(made):
        assert any(group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
                   for rule in role["rules"]), f"{verb} {resource} ({group or 'core'}) is not in the submitter Role"


def test_job_failed_on_bad_input_exits_2(kube_api, capsys):
    ctl = play_controller(kube_api, exit_code=2, reason="PodFailurePolicy",
                          log='moaa: error: /data/sft.jsonl: 1 bad row(s): line 3: not JSON\n')
    rc = submit(kube_api)
    ctl.join(5)
    cap = capsys.readouterr()
    assert rc == 2
    assert "line 3: not JSON" in cap.out  # the pod's own error line is shown
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "Job moaa/run1 failed on bad input" in err


def test_job_failed_otherwise_exits_1(kube_api, capsys):
    ctl = play_controller(kube_api, exit_code=1, reason="BackoffLimitExceeded")
    rc = submit(kube_api)
    ctl.join(5)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "BackoffLimitExceeded" in err and "exit codes [1]" in err


def test_out_of_memory_is_named(kube_api, capsys):
    """A trainer killed for memory says so, and which setting to raise."""
    ctl = play_controller(kube_api, exit_code=137, reason="BackoffLimitExceeded", killed="OOMKilled")
    rc = submit(kube_api)
    ctl.join(5)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "exit codes [137]" in err
    assert "OOMKilled" in err and "memory" in err and "--job-settings" in err


def _status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message,
            "code": code}


@pytest.mark.parametrize("code,reason,message,rc,expect", [
    (403, "Forbidden", 'jobs.batch is forbidden: User "dev" cannot create resource "jobs"', 2, "RBAC"),
    (422, "Invalid", 'Job.batch "run1" is invalid: spec.template.spec.containers[0].image: Required value', 2,
     "is invalid"),
    (503, "ServiceUnavailable", "etcd is down", 75, "etcd is down"),
])
def test_api_refusal_is_one_readable_line(kube_api, capsys, code, reason, message, rc, expect):
    kube_api.on(f"post /apis/batch/v1/namespaces/{NS}/jobs", code, _status(code, reason, message))
    assert submit(kube_api) == rc
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moaa: error: creating Job moaa/run1")
    assert str(code) in err and expect in err


def test_the_same_submit_again_follows_its_job_and_other_settings_conflict(kube_api, capsys):
    """After exit 75 (the API unreachable for a moment, or following timed out) the same command follows the
    Job it created, instead of exiting 2 on its name; a Job of that name running something else is an error."""
    assert submit(kube_api, "--follow-timeout", "0.3") == 75
    capsys.readouterr()
    play_controller(kube_api, exit_code=0)
    assert submit(kube_api) == 0
    events = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert events[0]["event"] == "job_exists" and events[0]["name"] == "run1"
    assert main(["train", "submit", "sft", *JOB_ARGS[:-1], "8", "--api-server", kube_api.url, "--no-follow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Job moaa/run1 exists and runs other settings" in err
    assert "kubectl -n moaa delete job run1" in err and "pass --name" in err


def test_unreachable_api_is_transient(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    rc = main(["train", "submit", "sft", *JOB_ARGS, "--api-server", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert rc == 75 and len(err.splitlines()) == 1 and "unreachable" in err


def test_follow_timeout_is_transient(kube_api, capsys):
    rc = submit(kube_api, "--follow-timeout", "0.5")
    err = capsys.readouterr().err.strip()
    assert rc == 75 and "keeps running" in err and "kubectl -n moaa logs -f job/run1" in err
    # no pod ever appeared (the Job controller could not make one): say where the reason is
    assert "no pod was created" in err and "kubectl -n moaa describe job/run1" in err
    assert len(err.splitlines()) == 1


def test_local_bad_data_stops_before_the_api(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [sft_rows(1)[0], "{oops"])
    rc = main(["train", "submit", "sft", "--data", str(bad), "--model", "m", "--out", "/checkpoints/x",
               "--api-server", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "line 2: not JSON" in err


def test_a_pod_that_cannot_start_is_reported(kube_api, capsys):
    """A Pending pod (no node with a free GPU, an image that cannot be pulled) says why, once per change,
    and following that times out names the reason instead of only 'keeps running'."""
    from kubernetes import client

    assert submit(kube_api, "--no-follow") == 0
    core = client.CoreV1Api(kube_api.client())
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
    core.create_namespaced_pod(NS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "run1-x1", "namespace": NS, "labels": {"job-name": "run1"}},
        "spec": {"containers": [{"name": "trainer", "image": "x"}], "restartPolicy": "Never"},
        "status": {"phase": "Pending", "conditions": [unschedulable]}})
    from moaa.errors import TransientError
    from moaa.trainer.k8s_submit import follow_job  # what `submit` does after creating the Job

    lines: list[str] = []
    with pytest.raises(TransientError) as err:
        follow_job(kube_api.client(), NS, "run1", timeout_s=0.6, poll_s=0.1, out=lines.append)
    waiting = [json.loads(x) for x in lines if '"pod_waiting"' in x]
    assert waiting == [{"event": "pod_waiting", "pod": "run1-x1", "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]
    assert "run1-x1 is waiting: Unschedulable: 0/3 nodes are available" in str(err.value)
    # scheduled, but the image cannot be pulled
    core.patch_namespaced_pod_status("run1-x1", NS, {"status": {"conditions": [
        {"type": "PodScheduled", "status": "True"}], "containerStatuses": [{
            "name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}}]}})
    lines.clear()
    with pytest.raises(TransientError) as err:
        follow_job(kube_api.client(), NS, "run1", timeout_s=0.6, poll_s=0.1, out=lines.append)
    assert [json.loads(x)["reason"] for x in lines if '"pod_waiting"' in x] == ["ImagePullBackOff"]
    assert len(str(err.value).splitlines()) == 1 and "ImagePullBackOff" in str(err.value)


def test_a_job_without_pods_says_so_while_following(kube_api):
    """No pod a minute after the Job was made (no service account, a quota, an admission webhook): one
    job_waiting line says where the reason is, long before following times out."""
    from moaa.errors import TransientError
    from moaa.trainer.k8s_submit import follow_job

    assert submit(kube_api, "--no-follow") == 0
    lines: list[str] = []
    with pytest.raises(TransientError):
        follow_job(kube_api.client(), NS, "run1", timeout_s=0.8, poll_s=0.1, out=lines.append, no_pod_hint_s=0.2)
    hints = [json.loads(x) for x in lines if '"job_waiting"' in x]
    assert hints == [{"event": "job_waiting", "name": "run1",
                      "message": "no pod yet: kubectl -n moaa describe job/run1 shows why "
                                 "(service account, quota, admission)"}]


def _pod(name: str, job: str, phase: str, exit_code: int | None = None) -> dict:
    state = {"terminated": {"exitCode": exit_code}} if exit_code is not None else {"running": {}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"job-name": job}},
            "spec": {"containers": [{"name": "trainer", "image": "x"}], "restartPolicy": "Never"},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "image": "x", "imageID": "",
                                                                "ready": phase == "Running", "restartCount": 0,
                                                                "state": state}]}}


def test_following_a_long_log_reads_only_what_is_new(kube_api):
    """A pod that has logged for an hour (2 MB): the first read has it all, then each poll reads only the
    last seconds (bounded, not the whole log again), every line is printed once and in order - also the
    lines logged in the same nanosecond at a poll's boundary - and a retried pod (a new name) is followed
    from its start, while the finished one is no longer read."""
    from kubernetes import client

    from moaa.trainer.k8s_submit import follow_job

    assert submit(kube_api, "--no-follow") == 0
    core, batch = client.CoreV1Api(kube_api.client()), client.BatchV1Api(kube_api.client())
    hour_ago = time.time_ns() - 3600 * 10**9
    old = PodLog()
    for i in range(20000):  # one line every 0.18 s for an hour, ending 5 minutes ago
        old.write(json.dumps({"event": "log", "step": i, "pad": "x" * 60}), at_ns=hour_ago + i * 165 * 10**6)
    kube_api.serve_log(NS, "run1-a", old)
    retry = kube_api.serve_log(NS, "run1-b", PodLog())
    core.create_namespaced_pod(NS, _pod("run1-a", "run1", "Running"))
    lines: list[str] = []
    expected = [x for _, x in old.lines]

    def controller():
        time.sleep(0.4)
        for i in range(5):  # the running pod goes on logging, twice in one nanosecond at times
            batch_lines = [f"a-{i}-{k}" for k in range(3)]
            old.write(*batch_lines)
            expected.extend(batch_lines)
            time.sleep(0.15)
        core.patch_namespaced_pod_status("run1-a", NS, {"status": _pod("", "", "Failed", 75)["status"]})
        time.sleep(0.3)
        core.create_namespaced_pod(NS, _pod("run1-b", "run1", "Running"))
        for i in range(4):
            retry.write(f"b-{i}")
            expected.append(f"b-{i}")
            time.sleep(0.15)
        core.patch_namespaced_pod_status("run1-b", NS, {"status": _pod("", "", "Succeeded", 0)["status"]})
        time.sleep(0.3)
        batch.patch_namespaced_job_status("run1", NS, {"status": {"succeeded": 1, "failed": 1, "conditions": [
            {"type": "Complete", "status": "True"}]}})

    ctl = threading.Thread(target=controller, daemon=True)
    ctl.start()
    assert follow_job(kube_api.client(), NS, "run1", timeout_s=30, poll_s=0.1, out=lines.append) == 0
    ctl.join(5)
    assert [x for x in lines if not x.startswith('{"event": "job_')] == expected
    total = sum(len(PodLog.stamp(0)) + 2 + len(x) for _, x in old.lines)
    first, *later = old.served
    assert first > 1_500_000 and len(later) >= 5
    assert max(later) < 2_000, later  # the new lines of the last seconds, not the hour again
    assert sum(old.served) < total + 10 * 2_000
    after_end = len(old.served)
    time.sleep(0.3)
    assert len(old.served) == after_end  # a finished pod is read once more after it ends, then left alone
