"""Bearer-token authentication as a grpc.aio server interceptor.

Tokens come from a file (one per line, as a mounted Kubernetes Secret provides them; re-read when the
file changes, so a rotated Secret takes effect without a restart) and/or an environment variable
(comma-separated). A call without a token, with a malformed one or with a token that is not accepted
gets UNAUTHENTICATED: each is a failed authentication (PERMISSION_DENIED would say the caller is known
but not allowed). Deleting the tokens file revokes its tokens (fail closed). Health checks stay open for
kubelet probes. Tokens never reach the logs.
"""
from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

import grpc

from moaa.services.common.decoding import HANDLER_KINDS, drain_requests
from moaa.services.common.logs import call_request_id
from moaa.services.config import AuthConfig

log = logging.getLogger(__name__)

# Probes (kubelet's gRPC probe) carry no token.
DEFAULT_EXEMPT = ("/grpc.health.v1.Health/",)


class TokenStore:
    """The accepted tokens; the file is re-read at most once a second when its mtime changed."""

    def __init__(self, cfg: AuthConfig):
        self.cfg = cfg
        self._file_tokens: frozenset[str] = frozenset()
        self._stamp: tuple | None = None  # (mtime_ns, size, inode) of the file last read
        self._checked = 0.0
        self._env_tokens = frozenset(self._split(os.environ.get(cfg.tokens_env, ""), ",")) if cfg.tokens_env else frozenset()
        if cfg.tokens_env and cfg.tokens_env not in os.environ:
            log.warning("auth: environment variable %s is not set; it provides no tokens", cfg.tokens_env)
        self._reload(force=True)
        if not self.tokens():
            log.warning("auth is enabled but no tokens are configured: every call will be refused")

    @staticmethod
    def _split(text: str, sep: str) -> list[str]:
        return [t.strip() for t in text.split(sep) if t.strip() and not t.strip().startswith("#")]

    def _reload(self, force: bool = False) -> None:
        if not self.cfg.tokens_file:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        path = Path(self.cfg.tokens_file)
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._file_tokens = frozenset(self._split(path.read_text(), "\n"))
                if self._stamp is not None:
                    log.info("auth: tokens file %s changed: %d tokens", path, len(self._file_tokens))
                self._stamp = stamp
        except OSError as err:
            # A deleted or unreadable file revokes its tokens: failing open would keep a revoked
            # Secret's tokens valid until the restart.
            if self._stamp is not None or force:
                log.warning("auth: cannot read tokens file %s (%s): its tokens are no longer accepted",
                            path, err.strerror or err)
            self._file_tokens = frozenset()
            self._stamp = None

    def tokens(self) -> frozenset[str]:
        self._reload()
        return self._file_tokens | self._env_tokens

    def accepts(self, token: str) -> bool:
        # compare against every token in constant time per token
        ok = False
        for t in self.tokens():
            ok |= hmac.compare_digest(t.encode(), token.encode())
        return ok


def bearer_problem(store: TokenStore, value: str, where: str, how: str) -> str | None:
    """What is wrong with an authorization value (`where` it came from, `how` to send one), or None."""
    scheme, _, token = value.partition(" ")
    if not value:
        return f"missing bearer token: {how}"
    if scheme.lower() != "bearer" or not token.strip():
        return f"malformed {where}: expected 'Bearer <token>'"
    if not store.accepts(token.strip()):
        return "the bearer token is not accepted: send a token from the server's tokens file or environment variable"
    return None


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str,
                   on_refused=None) -> grpc.RpcMethodHandler:
    kind = next((attr for attr in HANDLER_KINDS if getattr(handler, attr)), "stream_stream")
    request_streaming, response_streaming, make = HANDLER_KINDS[kind]

    async def refuse(request_or_iterator, context):
        if request_streaming:  # the client may still be writing: read that first (drain_requests)
            await drain_requests(request_or_iterator)
        rid = call_request_id("", context)
        if on_refused is not None:
            on_refused(rid)
        await context.abort(code, message)

    async def streaming(request_or_iterator, context):
        await refuse(request_or_iterator, context)
        yield  # pragma: no cover - makes this an async generator

    return make(streaming if response_streaming else refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call except the exempt method prefixes."""

    def __init__(self, store: TokenStore, exempt: tuple[str, ...] = DEFAULT_EXEMPT, guard=None):
        self.store = store
        self.exempt = exempt
        self.guard = guard  # a CallGuard: refused calls are counted and logged as calls that ended UNAUTHENTICATED

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.exempt):
            return handler
        value = ""
        for key, val in details.invocation_metadata or ():
            if key == "authorization":
                value = val if isinstance(val, str) else val.decode()
                break
        problem = bearer_problem(self.store, value, "authorization metadata",
                                 "send metadata 'authorization: Bearer <token>'")
        if not problem:
            return handler
        method = details.method.rsplit("/", 1)[-1]  # a registered method (handler found): bounded labels
        refused = None if self.guard is None else (
            lambda rid: self.guard.done(method, "UNAUTHENTICATED", 0.0, rid))
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, problem, refused)


def auth_interceptors(cfg: AuthConfig, guard=None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors for a server config: none when auth is off."""
    return [BearerAuthInterceptor(TokenStore(cfg), guard=guard)] if cfg.enabled else []
