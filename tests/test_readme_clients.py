"""The README's client examples, run as a user copies them, against a real gateway on free ports: the gRPC
client with the generated stubs, the OpenAI SDK and curl against the HTTP door, and `moaa generate`.
Only the addresses are changed (the README's 50051 and 8080 may be taken here)."""
from __future__ import annotations

import asyncio
import os
import shutil
import sys

import pytest

from tests.fixtures.gateway import moa_config
from tests.test_readme import code_blocks

TOKEN = "TOKEN"  # the README's own placeholder, made a real token of the gateway


@pytest.fixture
async def readme_gateway(gw_emulators, gateway_factory, monkeypatch):
    """A gateway with bearer tokens on, serving a recipe named `default` (the chart's name, which the
    README's HTTP examples use) over emulated backends."""
    monkeypatch.setenv("MOAA_README_TOKENS", TOKEN)
    emu = await gw_emulators(ttft_s=0.01)
    cfg = moa_config(emu.url, ["p1", "p2"], gateway={"auth": {"tokens_env": "MOAA_README_TOKENS"}})
    cfg["recipes"] = {"default": cfg["recipes"]["moa"]}
    return await gateway_factory(cfg)


async def _run(argv: list[str], env: dict | None = None, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout=120)
    return proc.returncode, out.decode(), err.decode()


def _python_example(marker: str) -> str:
    (code,) = [b for b in code_blocks("python") if marker in b]
    return code


async def test_readme_grpc_client_runs(readme_gateway):
    code = _python_example("gateway_pb2_grpc.MoAGatewayStub").replace("127.0.0.1:50051", readme_gateway.address)
    rc, out, err = await _run([sys.executable, "-c", code])
    assert rc == 0, err
    assert "[p1] " in out and "[p2] " in out and "total_s" in out   # proposals, deltas, then the final event


async def test_readme_openai_sdk_example_runs(readme_gateway):
    http = f"http://127.0.0.1:{readme_gateway.running.http_port}/v1"
    code = _python_example("from openai import OpenAI")
    assert "http://127.0.0.1:8080/v1" in code
    rc, out, err = await _run([sys.executable, "-c", code.replace("http://127.0.0.1:8080/v1", http)])
    assert rc == 0, err
    assert out.strip(), "the example printed no answer"


async def test_readme_responses_example_runs(readme_gateway):
    """The Responses API example, after the chat example's import and client (which it uses)."""
    http = f"http://127.0.0.1:{readme_gateway.running.http_port}/v1"
    setup = _python_example("from openai import OpenAI").split("\nresp = ", 1)[0]
    code = setup + "\n" + _python_example("client.responses.create")
    rc, out, err = await _run([sys.executable, "-c", code.replace("http://127.0.0.1:8080/v1", http)])
    assert rc == 0, err
    assert out.split()[-2] in ("completed", "incomplete"), out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
async def test_readme_curl_example_streams(readme_gateway):
    (cmd,) = [b for b in code_blocks("bash") if b.startswith("curl") and "chat/completions" in b and "Bearer" in b]
    cmd = cmd.replace("http://127.0.0.1:8080", f"http://127.0.0.1:{readme_gateway.running.http_port}")
    rc, out, err = await _run(["bash", "-c", cmd], env={"MOAA_TOKEN": TOKEN})
    assert rc == 0, err
    assert '"id":"chatcmpl-my-id-1"' in out.replace(" ", "") and out.rstrip().endswith("data: [DONE]"), out[-400:]


async def test_readme_generate_command_runs(readme_gateway):
    (line,) = [ln for b in code_blocks("bash") for ln in b.splitlines() if ln.startswith("moaa generate --gateway 127")]
    argv = line.split("#")[0].split(maxsplit=4)  # moaa generate --gateway ADDRESS "TEXT"
    assert argv[:3] == ["moaa", "generate", "--gateway"]
    rc, out, err = await _run([sys.executable, "-m", "moaa.cli.main", "generate", "--gateway", readme_gateway.address,
                               argv[4].strip().strip('"')], env={"MOAA_TOKEN": TOKEN})
    assert rc == 0, err
    assert "=== aggregated answer ===" in out


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
async def test_readme_backend_curl_gets_a_completion(gw_emulators):
    """The tour's first curl, against `moaa backend emulate` (the same HTTP API as `moaa backend serve`)."""
    import json

    emu = await gw_emulators()
    (block,) = [b for b in code_blocks("bash") if "moaa backend serve" in b and "curl" in b]
    cmd = block[block.index("curl"):].replace("\\\n", " ").strip()
    assert "http://127.0.0.1:8000/v1/chat/completions" in cmd
    rc, out, err = await _run(["bash", "-c", cmd.replace("http://127.0.0.1:8000/v1", emu.url)])
    assert rc == 0, err
    answer = json.loads(out)
    assert answer["model"] == "smollm2-135m-instruct" and answer["choices"][0]["message"]["content"]
