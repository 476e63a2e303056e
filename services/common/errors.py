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
