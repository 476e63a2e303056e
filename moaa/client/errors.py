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


def is_bad_input(code: grpc.StatusCode | str) -> bool:
    """Also for a stream item's ErrorDetail, whose code is the status name."""
    return (code.name if isinstance(code, grpc.StatusCode) else code) in BAD_INPUT_NAMES


def retry_delay(err: grpc.aio.AioRpcError, tries: int) -> float | None:
    """The wait before the next try of a call that failed with `err` after `tries` retries, or None to give
    up: only UNAVAILABLE (a server down or restarting) is retried, RETRY_DELAYS_S bounding it."""
    if err.code() == grpc.StatusCode.UNAVAILABLE and tries < len(RETRY_DELAYS_S):
        return RETRY_DELAYS_S[tries]
    return None


def call_error(err: grpc.aio.AioRpcError, what: str, hint: str = "", *, tries: int = 0) -> UserError | TransientError:
    """One line for a failed call: '<what>: CODE: details (hint)'; an UNAVAILABLE given up after `tries`
    retries says how many tries over how long."""
    if err.code() == grpc.StatusCode.UNAVAILABLE and tries:
        note = f"{tries + 1} tries over {sum(RETRY_DELAYS_S[:tries]):g} s"
        hint = f"{note}, {hint}" if hint else note
    msg = f"{what}: {err.code().name}: {err.details()}" + (f" ({hint})" if hint else "")
    return UserError(msg) if is_bad_input(err.code()) else TransientError(msg)
