"""The shared OpenAI-compatible backend client (gateway, annotator, pipeline use this one).

    pool = BackendPool(cfg.backends); await pool.start()
    res = await pool.client("model").chat(messages, sampling, n=1, timeout=None)
    async for chunk in pool.client("model").stream_chat(messages, sampling): ...
"""
from .client import BackendClient, ChatStream, normalize_messages
from .errors import CAUSES, BackendError, UnknownBackendError, error_message
from .pool import BackendPool, read_api_key
from .protocol import ChatChoice, ChatChunk, ChatResult, Usage, sampling_dict

__all__ = [
    "BackendPool", "BackendClient", "BackendError", "UnknownBackendError", "ChatResult", "ChatChoice",
    "ChatChunk", "ChatStream", "Usage", "CAUSES", "error_message", "normalize_messages", "read_api_key",
    "sampling_dict",
]
