"""The emulator's answers and each fault mode, seen from a plain aiohttp client."""
import argparse
import asyncio
import json
import socket
import time

import aiohttp
import pytest

from moaa.cli.backend import add_emulator_arguments, emulator_settings_from_args
from moaa.services.emulator import expected_text, run_emulator
from tests.fixtures.waiting import wait_for

MSGS = [{"role": "user", "content": "Say something about agents."}]


def body(model="m", **kw):
    return {"model": model, "messages": MSGS, **kw}


@pytest.fixture(scope="module")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, emu, payload, headers=None, timeout=5.0):
    return await http.post(emu.url + "/chat/completions", json=payload, headers=headers,
                           timeout=aiohttp.ClientTimeout(total=timeout))


async def read_events(resp):
    """SSE data payloads as parsed JSON (or the [DONE] string)."""
    events = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_answers_are_deterministic_and_sized_by_max_tokens(http, emulator):
    payload = body(max_tokens=7, seed=3)
    async with await post(http, emulator, payload) as r:
        first = await r.json()
    async with await post(http, emulator, payload) as r:
        again = await r.json()
    text = first["choices"][0]["message"]["content"]
    assert text == again["choices"][0]["message"]["content"] == expected_text(payload)
    assert len(text.split()) == 7 and first["choices"][0]["finish_reason"] == "length"
    assert first["usage"]["completion_tokens"] == 7
    async with await post(http, emulator, body(max_tokens=7, seed=4)) as r:
        other = (await r.json())["choices"][0]["message"]["content"]
    assert other != text


async def test_stop_ends_the_answer_before_the_first_stop_string(http, emulator):
    """As vLLM applies `stop`, so a test of stop sequences through moaa sees them applied."""
    free = expected_text(body(max_tokens=12, seed=3))
    stop = free.split()[4]   # a word the answer holds: it ends just before its first occurrence
    want = free[:free.index(stop)]
    for payload in (body(max_tokens=12, seed=3, stop=[stop, "never-said"]), body(max_tokens=12, seed=3, stop=stop)):
        async with await post(http, emulator, payload) as r:
            choice = (await r.json())["choices"][0]
        assert choice["message"]["content"] == want == expected_text(payload) and choice["finish_reason"] == "stop"
        async with await post(http, emulator, {**payload, "stream": True}) as r:
            events = [e for e in await read_events(r) if e != "[DONE]"]
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == want
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"


async def test_streamed_answer_matches_and_reports_usage_with_n(http, emulator):
    payload = body(max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
    async with await post(http, emulator, payload) as r:
        assert r.status == 200 and r.content_type == "text/event-stream"
        events = await read_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert events[-2]["choices"] == [] and usage["completion_tokens"] == 10
    texts = {0: "", 1: ""}
    for ev in events[:-2]:
        for ch in ev["choices"]:
            texts[ch["index"]] += ch["delta"].get("content", "")
    assert texts[0] == expected_text(payload, 0) and texts[1] == expected_text(payload, 1)
    assert texts[0] != texts[1]


async def test_time_to_first_token_and_speed_are_applied(http, emulator_factory):
    emu = await emulator_factory(ttft_s=0.2, tokens_per_s=50)
    t0 = time.monotonic()
    async with await post(http, emu, body(max_tokens=10, stream=True)) as r:
        await r.content.readline()  # headers and role chunk come after the ttft
        ttft = time.monotonic() - t0
        await read_events(r)
    total = time.monotonic() - t0
    assert ttft >= 0.19 and total >= 0.19 + 10 / 50 * 0.9  # lower bounds only


async def test_ttft_jitter_spreads_first_tokens_within_its_range(http, emulator_factory):
    emu = await emulator_factory(ttft_s=0.05, ttft_jitter_s=0.2)

    async def first_token() -> float:
        t0 = time.monotonic()
        async with await post(http, emu, body(max_tokens=1, stream=True)) as r:
            await r.content.readline()
            return time.monotonic() - t0

    ttfts = await asyncio.gather(*(first_token() for _ in range(12)))
    assert min(ttfts) >= 0.049 and max(ttfts) < 0.05 + 0.2 + 0.15
    assert max(ttfts) - min(ttfts) > 0.05  # spread, not one fixed delay


async def test_error_rates_answer_openai_style_bodies(http, emulator_factory):
    emu = await emulator_factory(profiles={"e429": {"error_rates": {429: 1.0}, "retry_after_s": 1},
                                           "e500": {"error_rates": {500: 1.0}},
                                           "e503": {"error_rates": {503: 1.0}}})
    for status in (429, 500, 503):
        async with await post(http, emu, body(f"e{status}")) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert err["message"] == f"emulated {status} error" and err["code"] == status
            if status == 429:
                assert r.headers["Retry-After"] == "1"
    assert emu.stats.errors == {429: 1, 500: 1, 503: 1}


async def test_error_rate_is_a_seeded_fraction(http, emulator_factory):
    emu = await emulator_factory(error_rates={500: 0.3}, seed=7)
    statuses = []
    for _ in range(40):
        async with await post(http, emu, body()) as r:
            statuses.append(r.status)
    failed = statuses.count(500)
    assert 4 <= failed <= 22 and set(statuses) == {200, 500}


async def test_concurrency_cap_rejects_with_429_or_queues(http, emulator_factory):
    emu = await emulator_factory(max_concurrency=2, ttft_s=0.2,
                                 profiles={"queued": {"overflow": "queue"}})

    async def one(model):
        async with await post(http, emu, body(model)) as r:
            return r.status, await r.json()

    results = await asyncio.gather(*(one("m") for _ in range(5)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 429, 429, 429]
    assert all("concurrency cap" in b["error"]["message"] for s, b in results if s == 429)
    assert emu.stats.rejected == 3
    emu.reset()
    results = await asyncio.gather(*(one("queued") for _ in range(5)))
    assert [s for s, _ in results] == [200] * 5 and emu.stats.max_in_flight == 5  # 2 served, 3 waited


async def test_stall_before_headers_hangs_while_health_says_200(http, emulator_factory):
    emu = await emulator_factory(stall_before_headers=True)
    with pytest.raises(asyncio.TimeoutError):
        await post(http, emu, body(stream=True), timeout=0.3)
    async with http.get(emu.root + "/health") as r:
        assert r.status == 200
    assert emu.stats.faults["stall_before_headers"] == 1
    assert await wait_for(lambda: emu.stats.disconnects == 1)  # the client gave up; the emulator saw it


async def test_stall_after_k_chunks(http, emulator_factory):
    emu = await emulator_factory(stall_after_chunks=2)
    async with await post(http, emu, body(stream=True), timeout=10) as r:
        lines = []

        async def read():
            async for line in r.content:
                if line.startswith(b"data: "):
                    lines.append(json.loads(line[6:]))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(read(), 0.4)   # not asyncio.timeout: 3.11+
    contents = [c["delta"].get("content") for ev in lines for c in ev["choices"]]
    assert len(lines) == 3 and contents[1:] == expected_text(body()).split(" ")[:1] + [" " + expected_text(body()).split(" ")[1]]


async def test_disconnect_in_the_middle_of_a_stream(http, emulator_factory):
    emu = await emulator_factory(disconnect_after_chunks=3)
    async with await post(http, emu, body(stream=True)) as r:
        assert r.status == 200
        seen = 0
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                seen += line.startswith(b"data: ")
    assert seen == 4  # role chunk + 3 tokens, then the connection dropped
    assert emu.stats.faults["disconnect"] == 1 and emu.stats.completed == 0


async def test_malformed_stream_chunk(http, emulator_factory):
    emu = await emulator_factory(malformed_after_chunks=1)
    async with await post(http, emu, body(stream=True)) as r:
        datas = []
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in r.content:
                if line.startswith(b"data: "):
                    datas.append(line[6:].strip())
    json.loads(datas[0]), json.loads(datas[1])
    with pytest.raises(ValueError):
        json.loads(datas[2])


async def test_in_stream_error_event(http, emulator_factory):
    emu = await emulator_factory(error_after_chunks=1)
    async with await post(http, emu, body(stream=True)) as r:
        events = await read_events(r)
    assert events[-2]["error"]["code"] == 500 and events[-1] == "[DONE]"


async def test_non_streamed_faults(http, emulator_factory):
    emu = await emulator_factory(profiles={"cut": {"disconnect_after_chunks": 0},
                                           "bad": {"malformed_after_chunks": 0}})
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with await post(http, emu, body("cut")) as r:
            await r.read()
    async with await post(http, emu, body("bad")) as r:
        with pytest.raises(ValueError):
            json.loads(await r.read())


async def test_per_request_overrides_by_model_suffix_and_header(http, emulator_factory):
    emu = await emulator_factory()
    async with await post(http, emu, body("m@error_rates={\"503\":1.0}")) as r:
        assert r.status == 503
    async with await post(http, emu, body("m"), headers={"X-Emulator": json.dumps({"error_rates": {"500": 1}})}) as r:
        assert r.status == 500
    async with await post(http, emu, body("m@ttft_s=-1")) as r:
        assert r.status == 400 and "ttft_s" in (await r.json())["error"]["message"]
    async with await post(http, emu, body("m@nonsense=1")) as r:
        assert r.status == 400
    async with await post(http, emu, body("m")) as r:
        assert r.status == 200
    assert [b["model"] for b in emu.bodies("m")][-1] == "m"


async def test_invalid_requests_get_400(http, emulator):
    for payload in ({"model": "m"}, {"model": "m", "messages": []}, body(max_tokens=0), body(n=0)):
        async with await post(http, emulator, payload) as r:
            assert r.status == 400 and (await r.json())["error"]["type"] == "BadRequestError"
    async with http.post(emulator.url + "/chat/completions", data=b"not json") as r:
        assert r.status == 400


async def test_api_key_required(http, emulator_factory):
    emu = await emulator_factory(api_key="s3cret")
    async with await post(http, emu, body()) as r:
        assert r.status == 401
    async with await post(http, emu, body(), headers={"Authorization": "Bearer s3cret"}) as r:
        assert r.status == 200


async def test_stats_endpoint_records_bodies_probes_and_client_disconnects(http, emulator_factory):
    emu = await emulator_factory(tokens_per_s=20, history=2)
    for i in range(3):
        async with await post(http, emu, body("agg", max_tokens=1, seed=i)) as r:
            await r.read()
    async with await post(http, emu, body("agg", max_tokens=1), headers={"X-Moaa-Probe": "1"}) as r:
        await r.read()
    r = await post(http, emu, body(stream=True, max_tokens=100))
    await r.content.readline()
    r.close()  # the client hangs up in the middle
    assert await wait_for(lambda: emu.stats.disconnects == 1)
    async with http.get(emu.root + "/emulator/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 4 and stats["probes"] == 1 and stats["disconnects"] == 1
    assert [b["seed"] for b in stats["bodies"]["agg"]] == [1, 2]  # the last `history` bodies
    async with http.patch(emu.root + "/emulator/settings", json={"error_rates": {"500": 1.0}}) as resp:
        assert resp.status == 200
    async with await post(http, emu, body()) as r:
        assert r.status == 500
    async with http.patch(emu.root + "/emulator/settings", json={"ttft_s": "soon"}) as resp:
        assert resp.status == 400
    async with http.post(emu.root + "/emulator/reset") as resp:
        assert resp.status == 200
    assert emu.stats.requests == 0
    async with http.get(emu.url + "/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == ["emulator"]


async def test_many_concurrent_streams(http, emulator_factory):
    emu = await emulator_factory(tokens_per_s=200)

    async def one(i):
        async with await post(http, emu, body(max_tokens=8, seed=i, stream=True)) as r:
            return len(await read_events(r))

    counts = await asyncio.gather(*(one(i) for i in range(200)))
    assert set(counts) == {11} and emu.stats.max_in_flight > 50


async def test_cli_arguments_and_run_emulator(http):
    parser = argparse.ArgumentParser()
    add_emulator_arguments(parser)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = parser.parse_args(["--port", str(port), "--ttft-s", "0.01", "--error-rate", "503=1",
                              "--profile", 'ok={"error_rates": {}}', "--model", "ok",
                              "--overflow", "queue", "--echo", "false", "--max-concurrency", "4"])
    settings, profiles = emulator_settings_from_args(args)
    assert (settings.overflow, settings.echo, settings.max_concurrency) == ("queue", False, 4)
    assert settings.ttft_s == 0.01 and settings.error_rates == {503: 1.0} and profiles == {"ok": {"error_rates": {}}}
    task = asyncio.create_task(run_emulator(settings, profiles, args.models, args.host, args.port))
    try:
        url = f"http://127.0.0.1:{port}"

        async def up():
            try:
                async with http.get(url + "/health") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False
        for _ in range(200):
            if await up():
                break
            await asyncio.sleep(0.02)
        async with http.post(url + "/v1/chat/completions", json=body("ok")) as r:
            assert r.status == 200
        async with http.post(url + "/v1/chat/completions", json=body("other")) as r:
            assert r.status == 503
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    from moaa.errors import UserError
    with pytest.raises(UserError):
        emulator_settings_from_args(parser.parse_args(["--settings", '{"ttft_s": -1}']))
    for bad in ("500=2", "x=0.1", "503"):
        with pytest.raises(UserError, match=f"bad --error-rate '{bad}': use STATUS=P"):
            emulator_settings_from_args(parser.parse_args(["--error-rate", bad]))


async def test_echo_answers_with_the_request_messages(http, emulator_factory):
    emu = await emulator_factory(profiles={"echo": {"echo": True}})
    payload = body("echo", messages=[{"role": "system", "content": "Refs: [1] alpha  [2] beta"},
                                     {"role": "user", "content": "Combine them."}], stream=True)
    async with await post(http, emu, payload) as r:
        events = await read_events(r)
    text = "".join(c["delta"].get("content", "") for ev in events[:-1] for c in ev["choices"])
    assert text == "system: Refs: [1] alpha  [2] beta\nuser: Combine them."
    async with await post(http, emu, {**payload, "stream": False, "max_tokens": 3}) as r:
        answer = await r.json()
    assert answer["choices"][0]["message"]["content"] == "system: Refs: [1]"
    assert answer["choices"][0]["finish_reason"] == "length"


async def test_judge_mode_answers_judging_prompts_by_the_model_name_policy(http, emulator_factory):
    emu = await emulator_factory(judge=True)
    pair = ("Which answer is better?\n[Answer A]\nLyon.\n[End of answer A]\n\n"
            "[Answer B]\nParis is the capital.\n[End of answer B]")
    async with await post(http, emu, body("keyword:paris+delay=0.05", messages=[{"role": "user", "content": pair}],
                                          stream=True)) as r:
        events = await read_events(r)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))
    assert text.endswith("[[B]]")
    async with await post(http, emu, body("first", messages=[{"role": "user", "content": pair}])) as r:
        assert (await r.json())["choices"][0]["message"]["content"].endswith("[[A]]")
    async with await post(http, emu, body("garbage", messages=[{"role": "user", "content": pair}])) as r:
        assert "[[" not in (await r.json())["choices"][0]["message"]["content"]
    stats = emu.stats.models
    assert stats["keyword:paris+delay=0.05"].requests == 1 and stats["keyword:paris+delay=0.05"].busy_s >= 0.05
    assert stats["first"].in_flight == 0 and stats["first"].max_in_flight == 1
    async with http.get(emu.root + "/emulator/stats") as r:
        assert (await r.json())["models"]["garbage"]["requests"] == 1


async def test_busy_time_counts_slot_seconds_served_not_time_queued(http, emulator_factory):
    """/emulator/stats' busy_s: what a benchmark checks its share-of-capacity figure against."""
    emu = await emulator_factory(max_concurrency=2, overflow="queue", ttft_s=0.2)

    async def one():
        async with await post(http, emu, body("m", stream=True, max_tokens=2)) as r:
            await r.read()

    await asyncio.gather(*(one() for _ in range(4)))  # two served at once, two waited for a slot
    async with http.get(emu.root + "/emulator/stats") as resp:
        busy = (await resp.json())["busy_s"]
    assert set(busy) == {"m"} and 0.8 <= busy["m"] < 1.2  # 4 x 0.2 s, the queueing not counted


def test_emulate_on_a_busy_port_or_unknown_host_is_one_line_naming_the_flag(capsys):
    from moaa.cli.main import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["backend", "emulate", "--port", str(busy.getsockname()[1])]) == 2
        assert "Address already in use): set --port to a free port" in capsys.readouterr().err
    assert main(["backend", "emulate", "--port", "0", "--host", "no-such-host.invalid"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "host 'no-such-host.invalid' does not resolve" in err, err
