"""Exceptions a servicer raises to answer with a specific gRPC status; `rpc.guard` maps them."""
from __future__ import annotations

import grpc


class RpcError(Exception):
    """An error with a gRPC status code and a message that says what to change."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgument(RpcError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(RpcError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RpcError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(RpcError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(RpcError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


DEADLINE_SLACK_S = 0.05  # a backend call cut by the caller's deadline ends within this of it


def outage(message: str, left_s: float | None, waiting_for: str, refused: bool = False) -> RpcError:
    """UNAVAILABLE for backends that failed (callers retry it), or DEADLINE_EXCEEDED when `left_s`, the
    seconds left of the caller's deadline, says it is that deadline which cut them: a retry with the same
    deadline would fail the same way. `refused`: every failure was the model refusing the caller's request
    for its length (vLLM's 400 for a prompt past its context), which no retry mends: INVALID_ARGUMENT."""
    if refused:
        return InvalidArgument(f"{message}; the model refused the request as sent: shorten it or ask for fewer tokens")
    if left_s is not None and left_s <= DEADLINE_SLACK_S:
        return DeadlineExceeded(f"the call's deadline passed while {waiting_for} still answering: allow more time")
    return Unavailable(message)
