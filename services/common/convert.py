"""Backend results as gRPC messages: the servers' side of the wire, so the HTTP backend layer
(`services/backend/`) never builds protobufs."""
from __future__ import annotations

from moaa.services.backend import BackendError, Usage
from moaa.v1 import common_pb2, gateway_pb2


def usage_proto(usage: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                            total_tokens=usage.total_tokens)


def backend_error_proto(err: BackendError) -> common_pb2.BackendError:
    return common_pb2.BackendError(**err.to_dict())


def models_info_proto(models: list[dict]) -> list[gateway_pb2.ModelInfo]:
    """`BackendPool.models_info()` as ListModels answers it."""
    return [gateway_pb2.ModelInfo(name=m["name"], served_model=m["served_model"],
                                  context_window=m["context_window"], max_concurrency=m["max_concurrency"],
                                  replicas=[gateway_pb2.Replica(**r) for r in m["replicas"]])
            for m in models]


def empty_answer_proto(model: str, endpoint: str, attempts: int, finish_reason: str | None,
                       setting: str) -> common_pb2.BackendError:
    """An answer with no text is a failure, not an answer: cut at max_tokens before any text (a reasoning model
    spent them all on its reasoning: raise `setting`), or ended with none."""
    if finish_reason == "length":
        return common_pb2.BackendError(model=model, endpoint=endpoint, cause="max_tokens", attempts=attempts,
                                       message=f"answer cut at max_tokens before any text: raise {setting}")
    return common_pb2.BackendError(model=model, endpoint=endpoint, cause="empty", attempts=attempts,
                                   message=f"an empty answer (finish_reason {finish_reason or 'none'})")
