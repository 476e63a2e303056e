"""`moaa train submit`: create the training Job, follow its status and logs, exit with its outcome.

Exit codes: 0 the Job completed; 2 the Job failed on bad input (or the API refused the Job: RBAC,
invalid object, name taken); 75 the API was unreachable or overloaded, or following timed out while
the Job still runs; 1 the Job failed otherwise (retries used up, deadline).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from moaa.errors import EXIT_BAD_INPUT, MoaaError, TransientError, UserError, validation_message
from moaa.overrides import load_mapping
from moaa.trainer.k8s import CONTAINER, JobSettings, Toleration, build_job, to_yaml

REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read: no API call may hang the submit


def add_submit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Kubernetes Job")
    g.add_argument("--job-settings", help="YAML file with JobSettings fields (flags override it)")
    g.add_argument("--name", help="Job name (default: moaa-KIND-<hash of --out>)")
    g.add_argument("--namespace", help="namespace (default moaa)")
    g.add_argument("--image", help="trainer image")
    g.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append", default=[], metavar="SECRET",
                   help="Secret for pulling the image from a private registry (repeat)")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable (repeat)")
    g.add_argument("--gpus", type=int, help="GPUs on one node (>1: torchrun across them)")
    g.add_argument("--launcher", choices=["torchrun", "accelerate"], help="multi-GPU launcher")
    g.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE", help="node label (repeat)")
    g.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                   help="tolerate a taint (repeat; replaces the default nvidia.com/gpu toleration)")
    g.add_argument("--hub-token-secret", help="Secret holding HF_TOKEN under key 'token'")
    g.add_argument("--backoff-limit", type=int, help="pod retries (bad input is never retried)")
    g.add_argument("--ttl", dest="ttl_seconds_after_finished", type=int, help="delete the finished Job after N s")
    g.add_argument("--dry-run", action="store_true", help="print the Job as YAML and stop")
    g.add_argument("--api-server", help="API server URL (no auth; default: kubeconfig or in-cluster config)")
    g.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    g.add_argument("--context", help="kubeconfig context")
    g.add_argument("--no-follow", action="store_true", help="create the Job and return")
    g.add_argument("--follow-timeout", type=_at_most(1e8), default=7 * 24 * 3600,
                   help="stop following after N seconds")
    g.add_argument("--poll-interval", type=_at_most(3600), default=5.0, help="seconds between status and log polls")


def _at_most(limit: float):
    """A positive, finite number of seconds up to `limit`: checked while parsing, before the Job exists."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not 0 < value < math.inf:   # nan fails both
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        if value > limit:
            raise argparse.ArgumentTypeError(f"expected at most {limit:g} seconds, got {text!r}")
        return value
    return parse


def settings_from_args(args: argparse.Namespace) -> JobSettings:
    data: dict[str, Any] = load_mapping(args.job_settings, "job settings file") if args.job_settings else {}
    for field in ("name", "namespace", "image", "gpus", "launcher", "hub_token_secret", "backoff_limit",
                  "ttl_seconds_after_finished"):
        if getattr(args, field, None) is not None:
            data[field] = getattr(args, field)
    if args.node_selector:
        data["node_selector"] = dict(_split(item, "=", "--node-selector") for item in args.node_selector)
    if args.toleration:
        data["tolerations"] = [_toleration(t) for t in args.toleration]
    if args.image_pull_secrets:
        data["image_pull_secrets"] = args.image_pull_secrets
    if args.env:
        base = data.get("env") or {}
        if not isinstance(base, dict):
            raise UserError("bad job settings: env: expected a mapping of NAME: VALUE")
        data["env"] = {**base, **dict(_split(item, "=", "--env") for item in args.env)}
    try:
        return JobSettings.model_validate(data)
    except ValidationError as err:
        raise UserError(f"bad job settings: {validation_message(err)}") from None


def _split(item: str, sep: str, flag: str) -> tuple[str, str]:
    key, found, value = item.partition(sep)
    if not found or not key:
        raise UserError(f"{flag} {item!r}: expected KEY{sep}VALUE")
    return key, value


def _toleration(text: str) -> dict:
    body, _, effect = text.partition(":")
    key, eq, value = body.partition("=")
    out: dict[str, Any] = {"key": key, "operator": "Equal" if eq else "Exists"}
    if eq:
        out["value"] = value
    if effect:
        out["effect"] = effect
    try:
        Toleration.model_validate(out)
    except ValidationError as err:
        raise UserError(f"--toleration {text!r}: {validation_message(err)}") from None
    return out


def api_client(args: argparse.Namespace):
    from kubernetes import client, config

    if args.api_server:
        problem = _url_problem(args.api_server)
        if problem:
            raise UserError(f"--api-server {args.api_server!r}: {problem}")
        cfg = client.Configuration()
        cfg.host = args.api_server.rstrip("/")
        cfg.retries = 1
        return client.ApiClient(cfg)
    try:
        return config.new_client_from_config(config_file=args.kubeconfig, context=args.context)
    except (config.ConfigException, OSError, TypeError) as err:
        if args.kubeconfig or args.context:
            raise UserError(f"cannot use kubeconfig: {str(err).splitlines()[0]}") from None
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        raise UserError("no Kubernetes config: set KUBECONFIG, pass --kubeconfig or --api-server") from None


def _url_problem(url: str) -> str | None:
    """What is wrong with an API server URL, or None (bad input: exit 2, not a retry)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        return f"not a URL ({err}): write e.g. https://10.0.0.1:6443"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not a URL: write e.g. https://10.0.0.1:6443"
    if port == 0:
        return "port 0: give the API server's port"
    return None


def _api_message(err) -> str:
    try:
        return json.loads(err.body).get("message") or err.reason
    except (TypeError, ValueError, AttributeError):
        return str(err.reason or err)


class JobExists(UserError):
    """The Job's name is taken (409)."""


def api_call(what: str, host: str, fn, *a, **kw):
    """One API call with bounded time; refusals become UserError, outages TransientError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return fn(*a, _request_timeout=REQUEST_TIMEOUT, **kw)
    except ApiException as err:
        status, msg = err.status, _api_message(err)
        if status in (401, 403):
            raise UserError(f"{what}: the Kubernetes API refused ({status} {err.reason}): {msg} "
                            f"(check credentials and RBAC, see k8s/20-rbac.yaml)") from None
        if status == 409:
            raise JobExists(f"{what}: {msg} (a Job for this output folder exists: delete it or pass --name)") from None
        if status in (400, 404, 422):
            raise UserError(f"{what}: the Kubernetes API rejected it ({status} {err.reason}): {msg}") from None
        raise TransientError(f"{what}: Kubernetes API error {status} {err.reason}: {msg}") from None
    except (HTTPError, OSError) as err:
        raise TransientError(f"{what}: Kubernetes API at {host} is unreachable ({type(err).__name__})") from None


def submit_from_args(args: argparse.Namespace, cfg) -> int:
    settings = settings_from_args(args)
    job = build_job(cfg, settings)
    if args.dry_run:
        print(to_yaml(job), end="")
        return 0
    from moaa.trainer.data import load_data

    # the files that are here too: checked before a GPU node spins up
    load_data(cfg.data, cfg.eval_data, cfg.kind, drop_duplicates=cfg.drop_duplicates, present_only=True)
    api = api_client(args)
    return submit(api, job, follow=not args.no_follow, timeout_s=args.follow_timeout, poll_s=args.poll_interval)


def submit(api, job, *, follow: bool = True, timeout_s: float = 3600, poll_s: float = 5.0, out=print) -> int:
    from kubernetes import client

    batch = client.BatchV1Api(api)
    ns, name = job.metadata.namespace, job.metadata.name
    host = api.configuration.host
    try:
        created = api_call(f"creating Job {ns}/{name}", host, batch.create_namespaced_job, ns, job)
        event = "job_created"
    except JobExists:
        # the same command again (after exit 75: the API was unreachable, or following timed out while the
        # Job ran on): follow the Job it created. A Job of that name running something else stays an error.
        created = api_call(f"reading Job {ns}/{name}", host, batch.read_namespaced_job, name, ns)
        if _runs(created) != _runs(job):
            raise UserError(f"Job {ns}/{name} exists and runs other settings: delete it "
                            f"(kubectl -n {ns} delete job {name}) or pass --name") from None
        event = "job_exists"
    out(json.dumps({"event": event, "namespace": ns, "name": created.metadata.name,
                    "uid": created.metadata.uid}))
    if not follow:
        return 0
    return follow_job(api, ns, name, timeout_s=timeout_s, poll_s=poll_s, out=out)


def _runs(job) -> tuple:
    """What a Job runs: its trainer container's image, command and arguments."""
    c = next(c for c in job.spec.template.spec.containers if c.name == CONTAINER)
    return c.image, list(c.command or []), list(c.args or [])


def _condition(job, kind: str):
    for c in (job.status and job.status.conditions) or []:
        if c.type == kind and c.status == "True":
            return c
    return None


def follow_job(api, ns: str, name: str, *, timeout_s: float, poll_s: float, out=print,
               no_pod_hint_s: float = 60.0) -> int:
    """Poll status and logs until the Job completes or fails; the pod's JSON progress lines pass through,
    a pod that cannot start (unschedulable, image pull, missing Secret) is reported when its reason changes,
    and a Job still without a pod after `no_pod_hint_s` says where to look, once."""
    from kubernetes import client

    batch, core = client.BatchV1Api(api), client.CoreV1Api(api)
    host = api.configuration.host
    started = time.monotonic()
    deadline = started + timeout_s
    hinted = False
    logs: dict[str, _LogCursor] = {}
    waiting: dict[str, tuple[str, str] | None] = {}
    last_status = None
    while True:
        # the Job itself carries its status; the jobs/status subresource would need its own RBAC rule
        job = api_call(f"reading Job {ns}/{name}", host, batch.read_namespaced_job, name, ns)
        pods = _pods(core, host, ns, name)
        for pod in pods:
            _print_new_log_lines(core, ns, pod, logs, out)
            why = _waiting_reason(pod)
            if why and why != waiting.get(pod.metadata.name):
                out(json.dumps({"event": "pod_waiting", "pod": pod.metadata.name, "reason": why[0], "message": why[1]}))
            waiting[pod.metadata.name] = why
        if not pods and not hinted and time.monotonic() - started > no_pod_hint_s:
            out(json.dumps({"event": "job_waiting", "name": name, "message": f"no pod yet: kubectl -n {ns} describe "
                            f"job/{name} shows why (service account, quota, admission)"}))
            hinted = True
        st = job.status
        status = (st.active or 0, st.succeeded or 0, st.failed or 0) if st else (0, 0, 0)
        if status != last_status:
            out(json.dumps({"event": "job_status", "active": status[0], "succeeded": status[1], "failed": status[2]}))
            last_status = status
        if _condition(job, "Complete"):
            out(json.dumps({"event": "job_complete", "name": name}))
            return 0
        failed = _condition(job, "Failed")
        if failed:
            codes = _exit_codes(pods)
            detail = f"{failed.reason or 'Failed'}: {failed.message or ''}".strip().rstrip(":")
            if EXIT_BAD_INPUT in codes or failed.reason == "PodFailurePolicy":
                raise UserError(f"Job {ns}/{name} failed on bad input (exit {EXIT_BAD_INPUT}; {detail}); "
                                f"see its log above")
            oom = "; OOMKilled: the trainer ran out of memory, raise `memory` (--job-settings)" \
                if "OOMKilled" in _termination_reasons(pods) else ""
            raise MoaaError(f"Job {ns}/{name} failed ({detail}; pod exit codes {sorted(codes) or 'unknown'}){oom}")
        if time.monotonic() > deadline:
            stuck = "".join(f"; pod {p} is waiting: {w[0]}: {w[1]}" for p, w in waiting.items() if w)
            if not waiting:  # e.g. a missing service account, a quota, an admission webhook
                stuck = f"; no pod was created: kubectl -n {ns} describe job/{name} shows why"
            raise TransientError(f"stopped following Job {ns}/{name} after {timeout_s:.0f}s; it keeps running "
                                 f"(kubectl -n {ns} logs -f job/{name}){stuck}")
        time.sleep(poll_s)


def _pods(core, host: str, ns: str, name: str) -> list:
    pods = api_call(f"listing pods of Job {ns}/{name}", host, core.list_namespaced_pod, ns,
                    label_selector=f"job-name={name}")
    mine = [p for p in pods.items if (p.metadata.labels or {}).get("job-name") == name]
    return sorted(mine, key=lambda p: (str(p.metadata.creation_timestamp or ""), p.metadata.name))


# Container states that are just a pod starting normally, not worth a line.
_STARTING = {"ContainerCreating", "PodInitializing"}


def _waiting_reason(pod) -> tuple[str, str] | None:
    """Why a pod is not running yet (no node fits, image not pulled, Secret missing ...), or None."""
    st = pod.status
    if st is None:
        return None
    for c in st.conditions or []:
        if c.type == "PodScheduled" and c.status == "False":
            return c.reason or "Unschedulable", " ".join((c.message or "").split())
    for cs in st.container_statuses or []:
        w = cs.state and cs.state.waiting
        if w is not None and w.reason and w.reason not in _STARTING:
            return w.reason, " ".join((w.message or "").split())
    return None


# How far back each log read reaches beyond the time since the previous one began: a read that takes up to
# REQUEST_TIMEOUT still cannot leave a gap, so no line is lost; the boundary lines are de-duplicated.
LOG_OVERLAP_S = int(sum(REQUEST_TIMEOUT)) + 1


@dataclass
class _LogCursor:
    """Where following one pod's log stands: the newest line printed (its kubelet timestamp) and how many
    printed lines carry exactly that timestamp, when the previous read began, and whether it is over."""
    last: tuple | None = None
    at_last: int = 0
    asked_at: float | None = None
    done: bool = False


def _log_time(stamp: str) -> tuple | None:
    """The kubelet's RFC3339(Nano) line timestamp as a comparable (datetime, nanoseconds), or None."""
    m = _STAMP.fullmatch(stamp)
    if not m:
        return None
    base, frac, zone = m.groups()
    return datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone)), int((frac or "").ljust(9, "0"))


_STAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)")


def _print_new_log_lines(core, ns: str, pod, cursors: dict[str, _LogCursor], out) -> None:
    """Print the pod's log lines not printed yet. The first read has the whole log; later ones ask only for
    the seconds since the previous read began (sinceSeconds, by this machine's clock: the node's may differ)
    plus LOG_OVERLAP_S, and drop what is older than the newest printed line, or as old and already printed.
    A pod whose trainer has ended is read once more, then left alone."""
    from kubernetes.client.exceptions import ApiException

    pname = pod.metadata.name
    cur = cursors.setdefault(pname, _LogCursor())
    if cur.done:
        return
    ended = any(cs.name == CONTAINER and cs.state and cs.state.terminated
                for cs in (pod.status and pod.status.container_statuses) or [])
    since = {} if cur.asked_at is None else {"since_seconds": math.ceil(time.monotonic() - cur.asked_at) + LOG_OVERLAP_S}
    asked = time.monotonic()
    try:
        text = core.read_namespaced_pod_log(pname, ns, container=CONTAINER, timestamps=True,
                                            _request_timeout=REQUEST_TIMEOUT, **since)
    except ApiException:
        return  # not started yet, or gone: status polling decides the outcome
    cur.asked_at, cur.done = asked, ended
    old, skip = cur.last, cur.at_last
    for raw in text.splitlines() if isinstance(text, str) else []:
        stamp, _, line = raw.partition(" ")
        when = _log_time(stamp)
        if when is None:  # not the kubelet's format: show it as it came
            out(raw)
            continue
        if old is not None and (when < old or (when == old and skip > 0)):
            skip -= when == old
            continue
        out(line)
        cur.last, cur.at_last = when, (cur.at_last + 1 if when == cur.last else 1)


def _terminations(pods) -> list:
    """The trainer container's terminated states (exit code, and the kubelet's reason, e.g. OOMKilled)."""
    out = []
    for pod in pods:
        for cs in (pod.status and pod.status.container_statuses) or []:
            term = cs.state and cs.state.terminated
            if cs.name == CONTAINER and term is not None:
                out.append(term)
    return out


def _exit_codes(pods) -> set[int]:
    return {int(t.exit_code) for t in _terminations(pods) if t.exit_code is not None}


def _termination_reasons(pods) -> set[str]:
    return {t.reason for t in _terminations(pods) if t.reason}
