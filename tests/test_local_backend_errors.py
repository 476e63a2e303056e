"""Failed starts and bad arguments of the embedded backend: one readable line, the engine's own reason."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys

import pytest

from moaa.cli.main import main
from moaa.errors import UserError
from moaa.engines import pick_engine, vllm_available
from moaa.services.local.engine import EngineServer, EngineStartError, engine_error_line, process_group_alive

VLLM_LOG = """\
(APIServer pid=123) INFO 11-26 10:00:00 [api_server.py:1] vLLM API server version 0.32.0
Traceback (most recent call last):
  File "/x/vllm/config/model.py", line 10, in __post_init__
    raise ValueError(msg)
(APIServer pid=123) pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, The checkpoint you are trying to load has model type `nonsense` [type=value_error]
(APIServer pid=123) ValueError: The checkpoint you are trying to load has model type `nonsense`
"""


def test_engine_error_line_picks_the_exception():
    assert engine_error_line(VLLM_LOG) == "ValueError: The checkpoint you are trying to load has model type `nonsense`"
    pydantic = VLLM_LOG.rsplit("\n", 2)[0]  # ends with the ValidationError and its indented reason
    assert engine_error_line(pydantic) == ("pydantic_core._pydantic_core.ValidationError: 1 validation error for "
                                           "ModelConfig: Value error, The checkpoint you are trying to load has "
                                           "model type `nonsense` [type=value_error]")
    assert engine_error_line("") == "no output"
    assert engine_error_line("starting\nOSError: [Errno 98] address already in use\nbye") == \
        "OSError: [Errno 98] address already in use"


def test_bad_engine_and_names_are_user_errors():
    with pytest.raises(UserError, match="unknown engine 'tgi'"):
        pick_engine("tgi")
    assert pick_engine("auto") == ("vllm" if vllm_available() else "transformers")


def test_one_engine_rule_for_server_and_sampler(monkeypatch):
    # the sampler (`moaa sample`) and the server share one pick_engine; offline sampling on a CPU-only
    # machine stays on transformers
    import moaa.engines as engines
    from moaa.trainer import sample

    assert sample.pick_engine is engines.pick_engine
    with pytest.raises(UserError, match="unknown engine"):
        sample.run_sample.__globals__["pick_engine"]("tgi")
    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    monkeypatch.setattr(engines, "_gpu_visible", lambda: False)
    assert engines.pick_engine("auto") == "vllm"
    assert engines.pick_engine("auto", vllm_on_cpu=False) == "transformers"
    monkeypatch.setattr(engines, "_gpu_visible", lambda: True)
    assert engines.pick_engine("auto", vllm_on_cpu=False) == "vllm"


async def test_bad_model_path_fails_before_any_engine_starts(tmp_path):
    srv = EngineServer(str(tmp_path / "nowhere"), engine="transformers")
    with pytest.raises(UserError, match="not a packaged model"):
        await srv.start()
    assert srv.pid is None


async def test_transformers_rejects_a_served_name_it_cannot_answer_to(tiny_model_dir):
    srv = EngineServer(str(tiny_model_dir), engine="transformers", served_model_name="org/name:v1")
    with pytest.raises(UserError, match="cannot be used with transformers serve"):
        await srv.start()
    assert srv.pid is None


def _without_chat_template(tiny_model_dir, folder):
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink()
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


@pytest.mark.parametrize("engine", ["transformers", "vllm"])
async def test_model_without_chat_template_fails_before_any_engine_starts(tmp_path, tiny_model_dir, engine):
    """Chat completions need the folder's chat template: without one transformers serve answered the readiness
    probe with HTTP 500 until the start-up timeout (10 min for the CLI), then a retryable exit 75."""
    srv = EngineServer(str(_without_chat_template(tiny_model_dir, tmp_path / "m")), engine=engine, startup_timeout_s=20)
    with pytest.raises(UserError, match=r"has no chat template") as info:
        await srv.start()
    assert srv.pid is None and "\n" not in str(info.value)


def test_cli_serve_model_without_chat_template_is_one_line_exit_2(tmp_path, tiny_model_dir, capsys):
    base = _without_chat_template(tiny_model_dir, tmp_path / "m")
    assert main(["backend", "serve", "--model", str(base), "--engine", "transformers", "--port", "0",
                 "--startup-timeout", "20"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[1].startswith(f"moaa: error: model folder {base} has no chat template"), err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "vllm"])
async def test_engine_failure_is_reported_with_the_engines_own_error(tmp_path, tiny_model_dir, engine):
    if engine == "vllm" and not vllm_available():
        pytest.skip("vllm is not installed here")
    broken = tmp_path / "broken-model"  # a real folder whose config names an architecture nobody has
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "nonsense", "architectures": ["Nonsense"]}))
    srv = EngineServer(str(broken), engine=engine, startup_timeout_s=300)
    with pytest.raises(EngineStartError) as info:
        await srv.start()
    msg = str(info.value)
    assert msg.startswith(f"{engine} engine for ") and "\n" not in msg
    assert "nonsense" in msg.lower(), msg
    assert not process_group_alive(srv.pid)  # nothing left running


def test_cli_serve_bad_arguments_exit_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["backend", "serve", "--model", "x", "--port", "http"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "port must be a number" in err
    with pytest.raises(SystemExit):
        main(["backend", "serve", "--model", "x", "--engine", "tgi"])
    assert "invalid choice: 'tgi'" in capsys.readouterr().err
    assert main(["backend", "serve", "--model", str(tmp_path / "none"), "--engine", "transformers"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"moaa backend: starting transformers .*\nmoaa: error: --model .* not a packaged model .*\n", err)


@pytest.mark.slow
async def test_cli_serve_runs_until_sigterm_and_forwards_it(tiny_model_dir):
    """`moaa backend serve` as a user runs it: ready line, real answers, SIGTERM -> clean exit, engine gone."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moaa.cli.main", "backend", "serve", "--model", str(tiny_model_dir),
        "--engine", "transformers", "--port", "0", "--served-model-name", "tiny",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=300)).decode()
        match = re.search(r"serving 'tiny' at (http://127\.0\.0\.1:\d+/v1) \(supports_n=false", line)
        assert match, line + (await proc.stderr.read()).decode()
        url = match.group(1)
        body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/chat/completions", json=body) as resp:
                assert resp.status == 200 and (await resp.json())["choices"]
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), timeout=60) == 0
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.post(f"{url}/chat/completions", json=body):
                    pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_serve_on_a_busy_port_is_one_line_exit_2(capsys):
    """Another server on the port would answer the readiness check: "serving" was printed, then exit 75."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["backend", "serve", "--model", "x", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"127.0.0.1:{port}" in err and "--port" in err, err


def test_cli_bad_log_file_and_cache_are_one_line_exit_2(tmp_path, capsys):
    for argv, needle in ((["backend", "serve", "--model", "x", "--port", "0", "--log-file", str(tmp_path)],
                          "--log-file"),
                         (["backend", "serve", "--model", "x", "--port", "0", "--log-file", str(tmp_path / "no" / "l")],
                          "give a file in an existing folder")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1] and err[-1].startswith("moaa: error:"), err
    (tmp_path / "file").write_text("x")
    assert main(["models", "prepare", "smollm2-135m-instruct", "--cache", str(tmp_path / "file")]) == 2
    assert "--cache" in capsys.readouterr().err
