"""The one mapping from a gRPC status to the CLI's errors: bad input (exit 2) or transient (exit 75)."""
from __future__ import annotations

import grpc

from moaa.errors import TransientError, UserError

# Statuses a retry does not fix: the caller must change the request, the token or the config.
BAD_INPUT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                       grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                       grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
BAD_INPUT_NAMES = frozenset(c.name for c in BAD_INPUT)


def is_bad_input(code: grpc.StatusCode | str) -> bool:
    """Also for a stream item's ErrorDetail, whose code is the status name."""
    return (code.name if isinstance(code, grpc.StatusCode) else code) in BAD_INPUT_NAMES


def call_error(err: grpc.aio.AioRpcError, what: str, hint: str = "") -> UserError | TransientError:
    """One line for a failed call: '<what>: CODE: details (hint)'."""
    msg = f"{what}: {err.code().name}: {err.details()}" + (f" ({hint})" if hint else "")
    return UserError(msg) if is_bad_input(err.code()) else TransientError(msg)
