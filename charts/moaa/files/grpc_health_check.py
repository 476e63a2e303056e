# gRPC health check of the moaa gateway, run by `helm test` in the moaa image (grpcio-health-checking).
# Env: MOAA_TARGET host:port; MOAA_TLS_DIR (tls.crt, tls.key, ca.crt) when TLS is on, MOAA_MUTUAL=1 to
# present tls.crt as client certificate; MOAA_TOKEN_FILE (first line = bearer token); MOAA_TIMEOUT seconds.
import os
import sys

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
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
