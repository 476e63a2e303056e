"""All configured backends: one client (one pooled HTTP session) per backend, and health probes."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from moaa.errors import UserError
from moaa.services.backend.config import BackendConfig

from .client import BackendClient
from .errors import UnknownBackendError
from .health import probe_loop
from .replicas import OPEN

log = logging.getLogger("moaa.backend")


def read_api_key(name: str, cfg: BackendConfig) -> str | None:
    """The bearer token from the file (a mounted Secret) or the environment variable the config names."""
    if cfg.api_key_file:
        try:
            key = Path(cfg.api_key_file).read_text().strip()
        except OSError as err:
            raise UserError(f"backend {name!r}: cannot read api_key_file {cfg.api_key_file}: {err.strerror}") from None
        if not key:
            raise UserError(f"backend {name!r}: api_key_file {cfg.api_key_file} is empty")
        return key
    if cfg.api_key_env:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise UserError(f"backend {name!r}: environment variable {cfg.api_key_env} (api_key_env) is not set")
        return key
    return None


class BackendPool:
    def __init__(self, backends: dict[str, BackendConfig], probes: bool = True):
        self._clients = {name: BackendClient(name, cfg, read_api_key(name, cfg)) for name, cfg in backends.items()}
        self._probes = probes
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Opens the sessions and starts the periodic health probes."""
        for client in self._clients.values():
            client._ensure_session()
            if self._probes:
                for replica in client.replicas.replicas:
                    self._tasks.append(asyncio.create_task(probe_loop(client, replica),
                                                           name=f"probe {client.name} {replica.url}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(*(c.close() for c in self._clients.values()))

    async def __aenter__(self) -> "BackendPool":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def names(self) -> list[str]:
        return list(self._clients)

    def __contains__(self, name: str) -> bool:
        return name in self._clients

    def client(self, name: str) -> BackendClient:
        try:
            return self._clients[name]
        except KeyError:
            raise UnknownBackendError(
                f"unknown model {name!r}; configured backends: {', '.join(sorted(self._clients)) or 'none'}") from None

    def reachable(self, name: str) -> bool:
        """A replica of this backend is healthy (probes) and its circuit is not open (request failures):
        what the servers' health statuses follow."""
        return any(r.healthy and r.circuit != OPEN for r in self.client(name).replicas.replicas)

    def models_info(self) -> list[dict]:
        """Per backend: replicas with health, circuit state and requests in flight (ListModels' shape)."""
        return [{"name": c.name, "served_model": c.served_model, "context_window": c.cfg.context_window,
                 "max_concurrency": c.cfg.max_concurrency, "replicas": [r.info() for r in c.replicas.replicas]}
                for c in self._clients.values()]
