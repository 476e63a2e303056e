"""moaa met as a hostile or careless client, and as an operator: secrets kept out of logs, auth that cannot
be switched off by an empty setting, client strings that cannot forge log lines. Real servers on
127.0.0.1 and real clients (grpc stubs, aiohttp); no model servers."""
from __future__ import annotations

import logging

import pytest

from moaa.client.endpoint import Endpoint
from moaa.errors import UserError
from moaa.services.config import parse_config
from moaa.v1 import gateway_pb2
from tests.fixtures.gateway import moa_config, request

FAST = {"ttft_s": 0.0}
SECRET = "sk-live-0123456789abcdef"


def _cfg(auth: dict) -> dict:
    return {"backends": {"m": {"urls": ["http://127.0.0.1:9/v1"]}}, "gateway": {"auth": auth}}


@pytest.mark.parametrize("auth", [{"tokens_env": SECRET}, {"tokens_env": f"{SECRET}\n"}])
def test_a_token_pasted_as_tokens_env_is_refused_without_echoing_it(auth):
    """Before: `tokens_env: <the token>` started the server, which logged 'environment variable <the
    token> is not set' at WARNING. Now the config is refused, naming the field, not the value."""
    with pytest.raises(UserError) as err:
        parse_config(_cfg(auth))
    assert "gateway.auth.tokens_env" in str(err.value) and SECRET not in str(err.value)


@pytest.mark.parametrize("auth", [{"tokens_file": ""}, {"tokens_env": ""}, {"tokens_file": "", "tokens_env": ""}])
def test_an_empty_auth_setting_is_refused_not_auth_off(auth):
    """Before: an empty tokens_file / tokens_env (a template that rendered an empty value) quietly meant
    auth off: every call served without a token. Now the config is refused."""
    with pytest.raises(UserError, match=r"gateway\.auth\.tokens_"):
        parse_config(_cfg(auth))


def test_backend_api_key_env_keeps_refusing_a_pasted_key():
    with pytest.raises(UserError) as err:
        parse_config({"backends": {"m": {"urls": ["http://127.0.0.1:9/v1"], "api_key_env": SECRET}}})
    assert "backends.m.api_key_env" in str(err.value) and SECRET not in str(err.value)


def test_an_endpoint_never_prints_its_token():
    ep = Endpoint("127.0.0.1:1", token=SECRET)
    assert SECRET not in repr(ep) and SECRET not in str(ep)
    assert ep.metadata == (("authorization", f"Bearer {SECRET}"),)


FORGED = "rid-1\n2026-01-01 00:00:00 INFO moaa.rpc [admin] call"


@pytest.fixture
async def gw(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    return await gateway_factory(moa_config(emu.url, ["a"]))


def _logged_ids(caplog) -> list[str]:
    return [r.request_id for r in caplog.records if hasattr(r, "request_id")]


@pytest.mark.parametrize("rid", [FORGED, "x" * 100_000, "tab\there"], ids=["newline", "100kB", "tab"])
async def test_a_grpc_request_id_cannot_forge_or_flood_log_lines(gw, caplog, rid):
    """Before: a GenerateRequest.request_id went into every log line of the call as sent: with
    --log-format text a newline forged a whole log line, and a 100 kB id was logged per line. The HTTP
    door already replaced such ids; now both doors do (client_request_id)."""
    caplog.set_level(logging.INFO)
    resp = await gw.stub.Generate(request(request_id=rid), timeout=10)
    assert resp.request_id != rid and resp.request_id.isprintable() and len(resp.request_id) <= 128
    ids = _logged_ids(caplog)
    assert resp.request_id in ids and all(i.isprintable() and len(i) <= 128 for i in ids)


async def test_a_batch_item_id_cannot_forge_log_lines(gw, caplog):
    """A batch item's log id is built from its row id when it sends no request id: the same check."""
    caplog.set_level(logging.INFO)
    items = [gateway_pb2.BatchItem(id="row\nforged", request=request()),
             gateway_pb2.BatchItem(id="row-2", request=request(request_id=FORGED))]
    results = {r.id: r async for r in gw.stub.GenerateBatch(iter(items), timeout=10)}
    assert set(results) == {"row\nforged", "row-2"}  # the row ids themselves are echoed untouched
    for r in results.values():
        assert r.response.request_id.isprintable() and r.response.request_id != FORGED
    assert all(i.isprintable() for i in _logged_ids(caplog))


async def test_http_request_id_header_is_checked_the_same_way(gw):
    import aiohttp

    url = f"http://127.0.0.1:{gw.running.http_port}/v1/models"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"x-request-id": "y" * 500}) as r:
            assert r.status == 200 and len(r.headers["x-request-id"]) <= 128
        async with s.get(url, headers={"x-request-id": "mine-1"}) as r:
            assert r.headers["x-request-id"] == "mine-1"


async def test_an_http_stream_to_a_client_that_never_reads_is_dropped(gw_emulators, gateway_factory):
    """Before: a streamed chat completion to a client that sent its request and then read nothing blocked
    the handler in aiohttp's drain forever, holding an in-flight slot and (the engine paused) a backend
    request. Now, once the client has taken nothing for gateway.http_client_timeout_s, the connection is
    dropped: the call ends CANCELLED and the slot is free."""
    import asyncio
    import json
    import socket
    import time

    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"http_client_timeout_s": 1.0},
                                          backends={"agg": {"context_window": 400_000}}))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel buffers little of the answer
    sock.connect(("127.0.0.1", gw.running.http_port))
    _, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"model": "moa", "stream": True, "max_tokens": 150_000,  # MBs of SSE chunks
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    limiter = gw.running.guard.limiter
    deadline = time.monotonic() + 30
    while limiter.in_flight == 0 and time.monotonic() < deadline:  # the call started
        await asyncio.sleep(0.05)
    while limiter.in_flight and time.monotonic() < deadline:  # ... and is dropped, not held
        await asyncio.sleep(0.1)
    assert limiter.in_flight == 0, "a client that never reads still holds its in-flight slot"
    writer.close()


async def test_a_slow_request_body_holds_no_in_flight_slot_and_gets_408(gw_emulators, gateway_factory):
    """Before: /v1/chat/completions took its in-flight slot before reading the body, so a client that sent
    headers and trickled (or never sent) its body held the slot forever: with max_in_flight of them every
    other client got 429. Now the body is read first, within gateway.http_client_timeout_s (408 after)."""
    import asyncio
    import json

    import aiohttp

    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"max_in_flight": 1, "http_client_timeout_s": 2.0}))
    port = gw.running.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\"")
    await writer.drain()
    await asyncio.sleep(0.3)
    body = {"model": "moa", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()  # the slow sender holds no slot
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    answer = json.loads(head.split(b"\r\n\r\n", 1)[1])
    assert "did not arrive within 2 s" in answer["error"]["message"]
    writer.close()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "/tmp/x"])
def test_a_contestant_name_cannot_leave_the_eval_folder(name):
    """Before: `moaa eval --contestant ../../x=URL#m` wrote its answers store to <out>/answers-../../x, outside
    the eval folder. Now NAME is checked like a file name (exit 2, one line)."""
    from moaa.pipeline.eval.contestant import parse_contestant

    assert parse_contestant("moa-1.b_c=http://127.0.0.1:8080/v1#moa").name == "moa-1.b_c"
    with pytest.raises(UserError, match="NAME may hold"):
        parse_contestant(f"{name}=http://127.0.0.1:8080/v1#moa")


async def test_client_strings_never_become_metric_labels(gw):
    """Pins: recipe/model names and request ids a client sends are not Prometheus label values (an
    unbounded label set would grow the scrape without bound); labels come from the config and the
    registered methods."""
    import aiohttp
    import grpc
    from prometheus_client import REGISTRY, generate_latest

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(recipe="evil-recipe-1", request_id="evil-rid-1"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions",
                          headers={"x-request-id": "evil-rid-2"},
                          json={"model": "evil-model-2", "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status == 404
    assert b"evil-" not in generate_latest(REGISTRY)


async def test_a_slowloris_connection_is_closed(gw_emulators, gateway_factory):
    """Before: aiohttp's keep-alive timeout (an hour) was the only bound on a connection that sent a header
    line now and then and never a whole request: each held a connection (an fd) for an hour. Now
    gateway.http_client_timeout_s bounds it."""
    import asyncio
    import time

    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"http_client_timeout_s": 1.5}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.running.http_port)
    writer.write(b"GET /v1/models HTTP/1.1\r\n")
    t0 = time.monotonic()
    closed = False
    for i in range(40):  # 10 s of a header line every 0.25 s
        await asyncio.sleep(0.25)
        if reader.at_eof() or writer.transport.is_closing():
            closed = True
            break
        writer.write(b"X-Slow-%d: 1\r\n" % i)
    assert closed, "a connection sending a header line now and then is still open after 10 s"
    assert time.monotonic() - t0 < 5
    writer.close()


def test_chart_mounts_the_token_and_key_secrets_unreadable_to_others(helm):
    """Before: the auth tokens and the TLS key were mounted with Kubernetes' default mode 0644 (readable by
    every user in the container). Now 0440: the server's user and its fsGroup only."""
    r = helm.template(["values-secure.yaml"], {"auth.existingSecret": "", "auth.tokens[0]": "t" * 32})
    mounted = 0
    for dep in r.of_kind("Deployment"):
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in vol and vol["name"] in ("auth", "tls"):
                mounted += 1
                assert vol["secret"].get("defaultMode") == 0o440, (dep["metadata"]["name"], vol)
    assert mounted >= 3  # gateway auth + tls, annotator auth


def test_a_config_with_a_python_yaml_tag_is_refused(tmp_path):
    """Pin: the one YAML reader is a SafeLoader; a python/object tag is an error, never a call."""
    from moaa.services.config import load_config

    marker = tmp_path / "ran"
    path = tmp_path / "c.yaml"
    path.write_text(f"backends: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError):
        load_config(path)
    assert not marker.exists()
