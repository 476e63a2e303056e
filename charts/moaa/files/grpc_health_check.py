# gRPC health check of the moaa gateway, run by `helm test` in the moaa image (grpcio-health-checking),
# then, with MOAA_HTTP_TARGET host:port, its OpenAI-compatible door: GET /health and GET /v1/models.
# Env: MOAA_TARGET host:port; MOAA_TLS_DIR (tls.crt, tls.key, ca.crt) when TLS is on, MOAA_MUTUAL=1 to
# present tls.crt as client certificate; MOAA_TOKEN_FILE (first line = bearer token); MOAA_TIMEOUT seconds.
import json
import os
import ssl
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = os.environ["MOAA_TARGET"]
tls_dir = os.environ.get("MOAA_TLS_DIR")


def read(path):
    return open(path, "rb").read() if path and os.path.exists(path) else None


if tls_dir:
    ca = read(os.path.join(tls_dir, "ca.crt")) or read(os.path.join(tls_dir, "tls.crt"))
    key = cert = None
    if os.environ.get("MOAA_MUTUAL") == "1":
        key, cert = read(os.path.join(tls_dir, "tls.key")), read(os.path.join(tls_dir, "tls.crt"))
    channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))
else:
    channel = grpc.insecure_channel(target)
metadata = []
token = read(os.environ.get("MOAA_TOKEN_FILE"))
if token and token.split():
    metadata.append(("authorization", "Bearer " + token.split()[0].decode()))
try:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""),
        timeout=float(os.environ.get("MOAA_TIMEOUT", "10")),
        metadata=metadata,
    )
except grpc.RpcError as err:
    print(f"gateway {target}: health check failed: {err.code().name}: {err.details()}")
    sys.exit(1)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"gateway {target}: {status}")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(1)

http_target = os.environ.get("MOAA_HTTP_TARGET")
if http_target:
    ctx = None
    if tls_dir:
        ctx = ssl.create_default_context(cadata=ca.decode())
        if key:
            ctx.load_cert_chain(os.path.join(tls_dir, "tls.crt"), os.path.join(tls_dir, "tls.key"))
    base = f"{'https' if tls_dir else 'http'}://{http_target}"
    headers = {"Authorization": "Bearer " + token.split()[0].decode()} if token and token.split() else {}
    try:
        for path in ("/health", "/v1/models"):
            req = urllib.request.Request(base + path, headers=headers)
            with urllib.request.urlopen(req, timeout=float(os.environ.get("MOAA_TIMEOUT", "10")), context=ctx) as r:
                body = json.loads(r.read())
        names = [m["id"] for m in body["data"] if m.get("moaa", {}).get("kind") == "recipe"]
    except Exception as err:  # noqa: BLE001 - any failure fails the test with one line
        print(f"gateway {base}: OpenAI-compatible HTTP check failed: {type(err).__name__}: {err}")
        sys.exit(1)
    print(f"gateway {base}/v1: serving recipes {', '.join(names) or 'none'}")
sys.exit(0)
