"""The embedded default: one real small model behind every role, gateway and annotator as local processes.

SmolLM2-135M-Instruct (packaged on PyPI, prepared once into moaa's model cache) is served by the
embedded backend (vLLM where installed, else transformers' server) and plays three proposers with
different system prompts and temperatures, the aggregator, and three judges with different
verdicts. The gateway and the annotator run as `moaa gateway serve` / `moaa annotator serve` child
processes on 127.0.0.1 with the config written to the run folder (`moaa.yaml`). Every child (engine
included) is tied to the pipeline's process: a killed run leaves none behind (services/local/lifeline.py).

Services start at the first stage that calls them and stay up to the end of the run: idle, they cost
training and sampling nothing measurable, and each restart cost ~45 s. Ports are fixed per pipeline run
so addresses stay valid when a resumed run starts them again.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from moaa.errors import TransientError

from .layout import RunLayout

LOCAL_MODEL = "smollm2-135m-instruct"
BACKEND = "smollm2"
# Another small model for the embedded stack (a packaged name or a model folder: tests use the tiny one);
# it is served in every role and is the default model to train.
MODEL_ENV = "MOAA_LOCAL_MODEL"


def local_model() -> str:
    return os.environ.get(MODEL_ENV) or LOCAL_MODEL

PROPOSERS = [
    ("You are a careful, accurate assistant. Check facts and reasoning before you answer.", 0.3, 0.9),
    ("You are a friendly teacher. Explain clearly, with a short example where it helps.", 0.8, 0.95),
    ("You are a concise expert. Answer directly in a few well-organised sentences.", 0.6, 0.9),
]


def default_target() -> str:
    """The model trained by the embedded pipeline: SmolLM2-135M-Instruct from the model cache (or $MOAA_LOCAL_MODEL)."""
    from moaa.models import resolve_model

    return str(resolve_model(local_model(), source=MODEL_ENV).path)


# SmolLM2-135M cannot write JSON or criteria and gives the same 1-10 score to everything; asked which of two
# answers responds to the question, it does pick (the annotator's SmolLM2 acceptance test measured this).
# So the local ensemble is pairwise, both orders, with the annotator's small-model templates, short verdicts.
LOCAL_JUDGES = {"judge-relevance": "pairwise_small_v1", "judge-topic": "pairwise_small_topic_v1",
                "judge-language": "pairwise_small_language_v1"}


def local_config(backend: dict[str, Any], gateway_port: int, annotator_port: int) -> dict:
    """The moaa config of the embedded stack (validated by the services' own config model)."""
    judges = dict(list(LOCAL_JUDGES.items())[:2])  # 2 roles: all pairs x both orders x judges calls per prompt
    return {
        "backends": {BACKEND: backend},
        "recipes": {"local": {
            "proposers": [{"model": BACKEND, "system_prompt": sp, "sampling": {"temperature": t, "top_p": p}}
                          for sp, t, p in PROPOSERS],
            "aggregator": {"model": BACKEND, "sampling": {"temperature": 0.2}},
            "layers": 1,
            "min_proposers": 2,
        }},
        "default_recipe": "local",
        "ensembles": {"local": {
            "judges": [{"name": n, "model": BACKEND, "template": t,
                        # the verdict comes first when it comes at all: 12 tokens parsed as many of 80 replies as 16
                        "sampling": {"temperature": 0.0, "max_tokens": 12}} for n, t in judges.items()],
            "mode": "pairwise",
            "combine": "mean",
            "min_margin": 0.5,
        }},
        "default_ensemble": "local",
        # no batch_window here: stage 1 and judging are admitted by the engine's free slots, as on a cluster
        "gateway": {"host": "127.0.0.1", "port": gateway_port, "http_port": 0},
        "annotator": {"host": "127.0.0.1", "port": annotator_port},
        "annotator_address": f"127.0.0.1:{annotator_port}",
    }


async def wait_serving(address: str, proc: asyncio.subprocess.Process, log_path: Path, what: str,
                       timeout_s: float = 120.0) -> None:
    """Until the gRPC health service says SERVING; a process that exits first fails with its last line."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moaa.client.endpoint import Endpoint

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with Endpoint(address).channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            if proc.returncode is not None:
                break
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.3)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
    reason = tail[0] if tail else "no output"
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # proc leads its group (spawn_tied)
    raise TransientError(f"the local {what} did not start ({reason}; log: {log_path})")


def _cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return None


def reap_stale(record: Path) -> int:
    """Kill the model server an earlier run of this folder left behind (its own process group). The
    lifeline ends it when the run dies; this covers a supervisor that was itself killed.

    Only a process whose pid AND command line match what this run folder recorded is touched.
    """
    import json

    if not record.exists():
        return 0
    killed = 0
    for entry in json.loads(record.read_text() or "[]"):
        if _cmdline(entry["pid"]) == entry["cmdline"]:
            try:
                os.killpg(entry["pid"], signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    record.unlink(missing_ok=True)
    return killed


class LocalStack:
    def __init__(self, layout: RunLayout, *, engine: str = "auto", quiet: bool = False):
        from moaa.services.local.engine import free_port

        self.layout, self.engine_name, self.quiet = layout, engine, quiet
        self.gateway_port, self.annotator_port, self.model_port = free_port(), free_port(), free_port()
        self.engine = None
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.pool = None
        self.backend: dict[str, Any] | None = None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def annotator_address(self) -> str:
        return f"127.0.0.1:{self.annotator_port}"

    @property
    def running(self) -> bool:
        return self.engine is not None

    async def start(self) -> None:
        """Model server, then config, gateway and annotator; no-op when already up."""
        if self.running:
            return
        from moaa.services.config import dump_config, parse_config
        from moaa.services.local.engine import EngineServer
        from moaa.services.local.lifeline import spawn_tied

        if not self.quiet:
            print("starting the embedded stack (SmolLM2-135M-Instruct, gateway, annotator) ...",
                  file=sys.stderr, flush=True)
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        reap_stale(self._pid_record)
        self.engine = EngineServer(local_model(), source=MODEL_ENV, engine=self.engine_name, port=self.model_port, served_model_name=BACKEND,
                                   max_model_len=2048, log_path=self.layout.logs / "model-server.log")
        try:
            await self.engine.start()
            self._record_pid()
            # vLLM's CPU engine measured here: 156 tok/s at 16 concurrent answers, 178 at 32 (judge prompts
            # 2.97 -> 3.30 req/s); more in flight is how the one engine core does more work per step
            bc = self.engine.backend_config(max_concurrency=32)
            self.backend = bc.model_dump(mode="json", exclude_none=True)
            cfg = parse_config(local_config(self.backend, self.gateway_port, self.annotator_port),
                               "embedded config")
            self.layout.config.write_text(dump_config(cfg))
            for kind, port in (("gateway", self.gateway_port), ("annotator", self.annotator_port)):
                log_path = self.layout.logs / f"{kind}.log"
                log = open(log_path, "ab")
                # the one way to start a service, `moaa gateway|annotator serve`, tied to this process:
                # it dies with the pipeline, even by kill -9
                proc = await spawn_tied(
                    [sys.executable, "-m", "moaa.cli.main", kind, "serve", "--config", str(self.layout.config)],
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                log.close()
                self.procs[kind] = proc
                await wait_serving(f"127.0.0.1:{port}", proc, log_path, kind)
        except BaseException:
            await self.stop()
            raise

    @property
    def _pid_record(self) -> Path:
        return self.layout.logs / "model-server.pid.json"

    def _record_pid(self) -> None:
        import json

        pid = self.engine.pid
        cmd = _cmdline(pid) if pid else None
        if cmd:
            self._pid_record.write_text(json.dumps([{"pid": pid, "cmdline": cmd}]))

    def chat_judge(self, ledger):
        """A pairwise/grading judge straight on the local model (for eval), started with the stack."""
        from .eval.judges import ChatPairJudge

        stack = self

        class _LazyPool:  # the backend URL is only known once the model server is up
            def client(self, name):
                if stack.pool is None:
                    from moaa.services.backend import BackendPool
                    from moaa.services.config import BackendConfig

                    stack.pool = BackendPool({BACKEND: BackendConfig(**stack.backend)}, probes=False)
                return stack.pool.client(name)

        return ChatPairJudge(_LazyPool(), BACKEND, max_tokens=48, ledger=ledger)

    async def stop(self) -> None:
        from moaa.services.local.lifeline import release

        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        for proc in self.procs.values():
            if proc.returncode is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and the service it runs
                await proc.wait()
            release(proc)
        self.procs.clear()
        if self.engine is not None:
            await self.engine.stop()
            self.engine = None
            self._pid_record.unlink(missing_ok=True)
