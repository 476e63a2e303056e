"""`moaa generate` and `moaa gateway serve` as a user runs them."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import grpc
import openai
import yaml

from moaa.cli.main import main
from moaa.v1 import gateway_pb2, gateway_pb2_grpc
from tests.fixtures.gateway import moa_config


async def test_generate_prints_proposals_then_streams_answer(gw_emulators, gateway_factory, capsys):
    emu = await gw_emulators({"a": {"ttft_s": 0.01}, "bad": {"error_rates": {500: 1.0}}, "agg": {"ttft_s": 0.01}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "bad"]))
    code = await asyncio.to_thread(main, ["generate", "--gateway", gw.address, "--max-tokens", "6", "Tell me a joke"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- proposal 1.1 (a," in out and "--- failed: bad (http_5xx)" in out
    assert out.index("--- proposal") < out.index("=== aggregated answer ===")
    answer = out.split("=== aggregated answer ===\n", 1)[1]
    body = emu.bodies("agg")[-1]
    assert body["max_tokens"] == 6 and answer.strip()
    assert emu.bodies("a")[-1]["messages"] == [{"role": "user", "content": "Tell me a joke"}]


async def test_generate_errors_are_one_line(gw_emulators, gateway_factory, capsys, monkeypatch, unused_tcp_port):
    emu = await gw_emulators()
    monkeypatch.setenv("MOAA_TEST_CLI_TOKENS", "good")
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_env": "MOAA_TEST_CLI_TOKENS"}}))
    code = await asyncio.to_thread(main, ["generate", "--gateway", gw.address, "--token", "bad", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "UNAUTHENTICATED" in err
    code = await asyncio.to_thread(main, ["generate", "--gateway", f"127.0.0.1:{unused_tcp_port}", "--timeout", "2", "hi"])
    err = capsys.readouterr().err
    assert code == 75 and err.startswith("moaa: error: gateway 127.0.0.1:") and err.count("\n") == 1
    assert "UNAVAILABLE" in err and "tries over" in err   # retried, within --timeout, then one line
    # a client certificate without its key (mutual TLS needs both)
    code = await asyncio.to_thread(main, ["generate", "--gateway", gw.address, "--tls-cert", "tls.crt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs both --tls-cert and --tls-key" in err
    # a CA file that is not PEM: a usage error before any call, not the C core's log lines and UNAVAILABLE
    code = await asyncio.to_thread(main, ["generate", "--gateway", gw.address, "--tls-ca", __file__, "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not PEM" in err


async def test_generate_bad_addresses_and_values_are_bad_input_at_once(http_gw, capsys, gw_tls_files, tmp_path):
    """What no retry can fix is exit 2 at once, before or at the first call: a port past 65535 (gRPC would
    wrap it and call another port), a URL, no address, a token a header cannot carry, values past what the
    wire holds, and the gateway's own HTTP door given as its gRPC address (HTTP/1 there)."""
    http_door = f"127.0.0.1:{http_gw.running.http_port}"
    t = gw_tls_files
    damaged = tmp_path / "damaged.crt"
    damaged.write_text(open(t["ca.crt"]).read().replace("\n", "\n!", 3))
    cases = [
        (["--gateway", "127.0.0.1:99999"], "needs a port (1..65535)"),
        (["--gateway", "http://127.0.0.1:50051"], "is a URL: write host:port without a scheme"),
        (["--gateway", ""], "needs a port"),
        (["--gateway", http_gw.address, "--token", "bad\ntoken"], "characters a gRPC header cannot carry"),
        (["--gateway", http_gw.address, "--max-tokens", "99999999999"], "at most 4294967295 tokens"),
        (["--gateway", http_gw.address, "--timeout", "1e300"], "at most 1000000 seconds"),
        (["--gateway", http_door], "an HTTP/1 server answers at that address"),
        # PEM files of the wrong kind, or damaged: named with the flag's file, not gRPC core's log lines and 75
        (["--gateway", http_gw.address, "--tls-ca", t["client.key"]], "not a certificate"),
        (["--gateway", http_gw.address, "--tls-ca", t["ca.crt"], "--tls-cert", t["client.key"], "--tls-key",
          t["client.crt"]], "are the certificate and the key swapped?"),
        (["--gateway", http_gw.address, "--tls-ca", str(damaged)], "block is damaged"),
    ]
    for args, needle in cases:
        try:
            code = await asyncio.to_thread(main, ["generate", *args, "hi"])
        except SystemExit as exc:   # argparse's own refusal
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and needle in err and "tries" not in err, (args, err)


async def test_generate_retries_a_gateway_that_comes_up_late(gw_emulators, gateway_factory, capsys, unused_tcp_port):
    """A gateway that is down when the command starts (a restart, a pod not ready yet) is retried a bounded
    number of times (UNAVAILABLE only) before the command gives up."""
    emu = await gw_emulators()
    run = asyncio.create_task(asyncio.to_thread(
        main, ["generate", "--gateway", f"127.0.0.1:{unused_tcp_port}", "--max-tokens", "4", "hi"]))
    await asyncio.sleep(0.8)
    await gateway_factory(moa_config(emu.url, ["a"], gateway={"port": unused_tcp_port}))
    assert await run == 0, capsys.readouterr().err
    assert "=== aggregated answer ===" in capsys.readouterr().out


async def test_generate_past_its_timeout_says_which_flag(gw_emulators, gateway_factory, capsys):
    emu = await gw_emulators({"a": {"ttft_s": 5.0}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    code = await asyncio.to_thread(main, ["generate", "--gateway", gw.address, "--timeout", "0.5", "hi"])
    err = capsys.readouterr().err
    assert code == 75 and err.count("\n") == 1 and "DEADLINE_EXCEEDED" in err
    assert "--timeout 0.5 s passed; give a larger --timeout" in err


async def test_generate_into_a_closed_pipe_stops_quietly(gw_emulators, gateway_factory):
    """`moaa generate ... | head -n 1`: the reader goes away; no error line, the shell's SIGPIPE status."""
    emu = await gw_emulators()
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "moaa.cli.main", "generate", "--gateway",
                                                    gw.address, "hi", stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 141 and err.decode() == ""


async def test_gateway_serve_runs_and_stops_on_sigterm(gw_emulators, tmp_path, unused_tcp_port, unused_tcp_port_factory):
    emu = await gw_emulators()
    cfg = moa_config(emu.url, ["a"], gateway={"port": unused_tcp_port})
    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(cfg))
    http_port = unused_tcp_port_factory()
    proc = subprocess.Popen([sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config", str(path),
                             "--http-port", str(http_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert f"listening on 127.0.0.1:{unused_tcp_port}" in line
        assert f"OpenAI-compatible HTTP on :{http_port}/v1" in line, line
        async with grpc.aio.insecure_channel(f"127.0.0.1:{unused_tcp_port}") as ch:
            resp = await gateway_pb2_grpc.MoAGatewayStub(ch).ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
            assert [m.name for m in resp.models] == ["a", "agg"]
        models = await openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x").models.list()
        assert [m.id for m in models.data][0] == "moa"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_gateway_serve_bad_config_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backends: {}\n")
    proc = subprocess.run([sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("moaa: error:") and proc.stderr.count("\n") == 1


def test_serving_processes_tune_the_garbage_collector():
    """What `serve` does once it serves (RunningServer.wait_for_signal): startup objects frozen, rare
    collections. In a child, as it changes the whole process."""
    code = ("import gc; from moaa.services.common.server import GC_THRESHOLDS, tune_gc_for_serving; "
            "tune_gc_for_serving(); print(gc.get_threshold() == GC_THRESHOLDS, gc.get_freeze_count() > 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr
