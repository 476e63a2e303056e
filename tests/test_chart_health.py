"""The chart's config starts the real gateway, and the `helm test` pod's own check passes against it.

The gateway runs in-process on 127.0.0.1 from the ConfigMap's config file; only what a cluster provides
is swapped (listen address, and the mount paths of the TLS and token Secrets). The check is the exact
Python program in the rendered test Pod, run as a subprocess with the Pod's environment.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys

import pytest
import yaml

from moaa.services.config import parse_config
from moaa.services.gateway.server import start_gateway

TOKEN = "chart-test-token-0123456789abcdef"


def pod_check(rendered):
    """The test Pod's health-check program and environment."""
    (pod,) = rendered.of_kind("Pod")
    (c,) = pod["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    return c["command"][2], {e["name"]: e["value"] for e in c["env"]}


async def run_check(code: str, env: dict) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


def local_config(text: str, paths: dict[str, str]) -> dict:
    """The rendered config with the in-cluster listen address and Secret mount paths replaced."""
    raw = yaml.safe_load(text)
    gw = raw["gateway"]
    gw.update(host="127.0.0.1", port=0, http_port=0 if gw.get("http_port") is not None else None)
    gw.pop("metrics_port", None)
    for section in ("tls", "auth"):
        for key, value in gw.get(section, {}).items():
            gw[section][key] = paths[value]
    return raw


@pytest.fixture
async def started():
    servers = []

    async def start(raw: dict):
        running = await start_gateway(parse_config(raw), probes=False)
        servers.append(running)
        return running

    yield start
    for s in servers:
        await s.stop(0)


async def test_default_chart_gateway_passes_the_helm_test(helm, started, tmp_path):
    r = helm.template()
    tokens = tmp_path / "tokens"  # auth is on by default: the chart-made Secret's generated token
    tokens.write_text(r.of_kind("Secret")[0]["stringData"]["tokens"])
    code, env = pod_check(r)
    running = await started(local_config(r.config_text(), {env["MOAA_TOKEN_FILE"]: str(tokens)}))
    assert env["MOAA_TARGET"] == "moaa-gateway:50051" and env["MOAA_HTTP_TARGET"] == "moaa-gateway:8080"
    env["MOAA_TOKEN_FILE"] = str(tokens)
    http = f"127.0.0.1:{running.http_port}"
    rc, out = await run_check(code, {**env, "MOAA_TARGET": running.address, "MOAA_HTTP_TARGET": http})
    assert rc == 0, out
    assert "SERVING" in out and f"http://{http}/v1: serving recipes default" in out
    # the HTTP door failing fails the test too
    rc, out = await run_check(code, {**env, "MOAA_TARGET": running.address, "MOAA_HTTP_TARGET": "127.0.0.1:1"})
    assert rc == 1 and "OpenAI-compatible HTTP check failed" in out, out
    # a gateway going down (NOT_SERVING during shutdown, then gone) fails the check
    await running.stop(0)
    rc, out = await run_check(code, {**env, "MOAA_TARGET": running.address, "MOAA_TIMEOUT": "3"})
    assert rc == 1 and "UNAVAILABLE" in out, out


async def test_secure_chart_gateway_passes_the_helm_test(helm, started, gw_tls_files, tmp_path):
    """values-secure.yaml: mutual TLS and bearer tokens, the same Secrets mounted in gateway and test pod."""
    r = helm.template(["values-secure.yaml"])
    tls_dir = tmp_path / "tls"  # what the kubernetes.io/tls Secret holds
    tls_dir.mkdir()
    for src, dst in (("server.crt", "tls.crt"), ("server.key", "tls.key"), ("ca.crt", "ca.crt")):
        shutil.copy(gw_tls_files[src], tls_dir / dst)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\nanother-token-abcdefghijklmnop\n")
    code, env = pod_check(r)
    paths = {"/etc/moaa/tls/tls.crt": str(tls_dir / "tls.crt"), "/etc/moaa/tls/tls.key": str(tls_dir / "tls.key"),
             "/etc/moaa/tls/ca.crt": str(tls_dir / "ca.crt"), env["MOAA_TOKEN_FILE"]: str(tokens)}
    raw = local_config(r.config_text(), paths)
    assert raw["gateway"]["tls"]["client_ca_file"] and raw["gateway"]["auth"]["tokens_file"]
    running = await started(raw)
    local = {**env, "MOAA_TARGET": f"localhost:{running.port}", "MOAA_TLS_DIR": str(tls_dir),
             "MOAA_HTTP_TARGET": f"localhost:{running.http_port}",
             "MOAA_TOKEN_FILE": str(tokens), "MOAA_TIMEOUT": "5"}
    assert env["MOAA_MUTUAL"] == "1"
    rc, out = await run_check(code, local)
    assert rc == 0, out
    assert "SERVING" in out and f"https://localhost:{running.http_port}/v1: serving recipes" in out
    # without a client certificate the handshake is refused: mutual TLS is really on
    rc, out = await run_check(code, {**local, "MOAA_MUTUAL": "0"})
    assert rc == 1 and "health check failed" in out, out


async def test_install_notes_generate_command_works_against_the_secure_gateway(helm, started, gw_tls_files,
                                                                               emulator, tmp_path):
    """The `moaa generate` line `helm install -f values-secure.yaml` prints, run as printed (from a folder
    holding the Secret's files) through the port-forward it prints, reaches the mutual-TLS, token-guarded
    gateway, whose certificate names its Service (not localhost), and streams an answer."""
    r = helm.template(["values-secure.yaml"])
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    for src, dst in (("service.crt", "tls.crt"), ("service.key", "tls.key"), ("ca.crt", "ca.crt")):
        shutil.copy(gw_tls_files[src], tls_dir / dst)
    # the client's own certificate, signed by the same CA, under the names the notes use
    shutil.copy(gw_tls_files["client.crt"], tmp_path / "tls.crt")
    shutil.copy(gw_tls_files["client.key"], tmp_path / "tls.key")
    shutil.copy(gw_tls_files["ca.crt"], tmp_path / "ca.crt")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    _, env = pod_check(r)
    raw = local_config(r.config_text(), {"/etc/moaa/tls/tls.crt": str(tls_dir / "tls.crt"),
                                         "/etc/moaa/tls/tls.key": str(tls_dir / "tls.key"),
                                         "/etc/moaa/tls/ca.crt": str(tls_dir / "ca.crt"),
                                         env["MOAA_TOKEN_FILE"]: str(tokens)})
    for backend in raw["backends"].values():
        backend["urls"] = [emulator.url]  # the model Services, here one emulated OpenAI-compatible server
    running = await started(raw)
    (line,) = [x.strip() for x in helm.notes(["values-secure.yaml"]).splitlines() if x.strip().startswith("moaa generate")]
    argv = [a.replace("$GATEWAY", f"localhost:{running.port}").replace("$MOAA_TOKEN", TOKEN)
            for a in shlex.split(line)]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "moaa.cli.main", *argv[1:], cwd=tmp_path,
                                                env={**os.environ, "MOAA_TOKEN": ""},
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (line, err.decode())
    assert out.strip()


async def test_kubelet_probes_ask_what_the_servers_answer(helm, started, tmp_path):
    """The gateway's and annotator's readiness and liveness probes are kubelet gRPC probes: Health/Check of
    the overall service "", no token (auth is on by default), on the port the probe names. The real servers,
    started from the chart's config, answer that SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moaa.services.annotator.server import start_annotator

    r = helm.template()
    tokens = tmp_path / "tokens"
    tokens.write_text(r.of_kind("Secret")[0]["stringData"]["tokens"])
    raw = yaml.safe_load(r.config_text())
    cfg = parse_config(raw)
    for which in ("gateway", "annotator"):
        (c,) = r.get("Deployment", f"moaa-{which}")["spec"]["template"]["spec"]["containers"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": getattr(cfg, which).port}, (which, probe)
        raw[which]["auth"]["tokens_file"] = str(tokens)
    gateway = await started(local_config(yaml.safe_dump(raw), {str(tokens): str(tokens)}))
    annotator = await start_annotator(parse_config({**raw, "annotator": {**raw["annotator"], "host": "127.0.0.1",
                                                                         "metrics_port": None}}),
                                      port=0, probes=False)
    try:
        for running in (gateway, annotator):
            async with grpc.aio.insecure_channel(running.address) as ch:
                reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await annotator.stop(0)
