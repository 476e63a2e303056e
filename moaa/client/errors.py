"""The one mapping from a gRPC status to the CLI's errors: bad input (exit 2) or transient (exit 75),
and the one retry bound of the client package for a server that is down or restarting (UNAVAILABLE)."""
from __future__ import annotations

import grpc

from moaa.errors import TransientError, UserError

# Statuses a retry does not fix: the caller must change the request, the token or the config.
BAD_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                       grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                       grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
BAD_INPUT_NAMES = frozenset(c.name for c in BAD_INPUT)

# Waits before the retries of a call that answered UNAVAILABLE: 4 tries in about 3.5 s, enough for a
# restarting server's port to come back, short enough that a wrong address fails soon.
RETRY_DELAYS_S = (0.5, 1.0, 2.0)

# gRPC core's words for a TLS handshake that the client's own checks refused: a certificate from another CA
# or for another name, or a server that does not speak TLS. It is UNAVAILABLE like a server that is down,
# but a retry meets the same certificate: the caller must change a flag. (A server that refuses the client's
# certificate only closes the socket, which reads like a restart and stays retried.)
TLS_REFUSALS = ("Tls handshake failed", "Hostname Verification Check failed")
TLS_HINT = ("the server's certificate was refused: --tls-ca must be the CA that signed it and the address (or "
            "--tls-server-name) a name it holds; a server without TLS is dialled without --tls/--tls-ca")


# gRPC core's words for a port where an HTTP/1 server listens (the gateway's own HTTP door, a proxy's page):
# a retry reaches the same server, so the address is the caller's to change
HTTP1_REFUSALS = ("Trying to connect an http1.x server",)
HTTP1_HINT = ("an HTTP/1 server answers at that address, not a gRPC service: is it the right port? the gateway's "
              "gRPC port is 50051 (its OpenAI-compatible HTTP door 8080), the annotator's 50052")


def is_bad_input(code: grpc.StatusCode | str) -> bool:
    """Also for a stream item's ErrorDetail, whose code is the status name."""
    return (code.name if isinstance(code, grpc.StatusCode) else code) in BAD_INPUT_NAMES


def tls_refused(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(w in (err.details() or "") for w in TLS_REFUSALS)


def http1_server(err: grpc.aio.AioRpcError) -> bool:
    return err.code() == grpc.StatusCode.UNAVAILABLE and any(w in (err.details() or "") for w in HTTP1_REFUSALS)


def backoff(tries: int) -> float | None:
    """The wait before the next try after `tries` retries, or None to give up (RETRY_DELAYS_S bounds them)."""
    return RETRY_DELAYS_S[tries] if tries < len(RETRY_DELAYS_S) else None


# gRPC core's own INTERNAL for a stream its transport lost mid-write (a server stopped while the client was
# sending): the server said nothing, so it is a server going away, as UNAVAILABLE is
CORE_TRANSPORT_ERROR = "Internal error from Core"


def retry_delay(err: grpc.aio.AioRpcError, tries: int) -> float | None:
    """The wait before the next try of a call that failed with `err` after `tries` retries, or None to give
    up: only a server down or restarting (UNAVAILABLE, or core's transport INTERNAL) is retried, RETRY_DELAYS_S
    bounding it."""
    gone = err.code() == grpc.StatusCode.UNAVAILABLE or (
        err.code() == grpc.StatusCode.INTERNAL and err.details() == CORE_TRANSPORT_ERROR)
    if gone and not tls_refused(err) and not http1_server(err):
        return backoff(tries)
    return None


def call_error(err: grpc.aio.AioRpcError, what: str, hint: str = "", *, tries: int = 0) -> UserError | TransientError:
    """One line for a failed call: '<what>: CODE: details (hint)'; an UNAVAILABLE given up after `tries`
    retries says how many tries over how long; a refused TLS handshake is the caller's to fix (exit 2)."""
    if tls_refused(err):
        return UserError(f"{what}: {err.code().name}: {err.details()} ({TLS_HINT})")
    if http1_server(err):
        return UserError(f"{what}: {err.code().name}: {err.details()} ({HTTP1_HINT})")
    if err.code() == grpc.StatusCode.UNIMPLEMENTED:   # another service on that port: a retry asks it again
        return UserError(f"{what}: {err.code().name}: {err.details()} (the server at that address does not serve "
                         "this method: is it the right port? the gateway serves 50051, the annotator 50052)")
    if err.code() == grpc.StatusCode.UNAVAILABLE and tries:
        note = f"{tries + 1} tries over {sum(RETRY_DELAYS_S[:tries]):g} s"
        hint = f"{note}, {hint}" if hint else note
    msg = f"{what}: {err.code().name}: {err.details()}" + (f" ({hint})" if hint else "")
    return UserError(msg) if is_bad_input(err.code()) else TransientError(msg)
