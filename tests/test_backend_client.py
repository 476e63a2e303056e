"""The shared backend client against real emulator servers: answers, streaming, n, and typed errors."""
import asyncio
import socket

import pytest

from moaa.errors import UserError
from moaa.services.backend import BackendError, BackendPool, ChatResult, Usage
from moaa.services.backend.errors import UnknownBackendError, error_message
from moaa.services.common.convert import backend_error_proto
from moaa.services.config import BackendConfig, SamplingConfig
from moaa.services.emulator import expected_text
from moaa.v1 import common_pb2

MSGS = [{"role": "user", "content": "Tell me about mixtures of agents."}]


def make_cfg(*urls, **over) -> BackendConfig:
    """Fast test settings: sub-second timeouts and backoffs."""
    base = {"urls": list(urls),
            "timeouts": {"connect_s": 0.5, "first_token_s": 1.0, "chunk_gap_s": 0.5, "total_s": 5.0},
            "retries": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
            "circuit": {"failure_threshold": 5, "reset_after_s": 0.3},
            "health": {"probe_interval_s": 60, "probe_timeout_s": 0.5}}
    for key, value in over.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
    return BackendConfig.model_validate(base)


def free_port_url() -> str:
    """A URL where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def emu_body(model, n=None, **sampling):
    """The body the client sends, as the emulator hashes it."""
    return {"model": model, "messages": MSGS, **sampling}


async def test_chat_returns_the_emulators_text_usage_and_timings(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url)})
    res = await pool.client("m").chat(MSGS, SamplingConfig(max_tokens=6, seed=1))
    assert isinstance(res, ChatResult)
    assert res.text == expected_text(emu_body("m", seed=1), max_tokens=6)
    assert res.model == "m" and res.endpoint == emulator.url and res.finish_reason == "length"
    assert res.usage.completion_tokens == 6 and res.usage.total_tokens > 6
    assert res.ttft_s is not None and res.latency_s >= res.ttft_s and res.attempts == 1 and res.note == ""
    sent = emulator.bodies("m")[-1]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 6 and "temperature" not in sent  # unset sampling stays unset


async def test_served_model_name_and_dict_sampling(emulator, pool_of):
    pool = await pool_of({"alias": make_cfg(emulator.url, served_model="real-name")})
    res = await pool.client("alias").chat(MSGS, {"max_tokens": 3, "temperature": 0.5})
    assert res.model == "alias" and emulator.bodies("real-name")[-1]["temperature"] == 0.5
    with pytest.raises(ValueError):
        await pool.client("alias").chat(MSGS, {"temperature": 9})


async def test_stream_chat_yields_deltas_then_usage(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url)})
    chunks = []
    stream = pool.client("m").stream_chat(MSGS, {"max_tokens": 5, "seed": 2})
    async for chunk in stream:
        chunks.append(chunk)
    text = "".join(c.text for c in chunks)
    assert text == expected_text(emu_body("m", seed=2), max_tokens=5) == stream.text
    assert chunks[-1].usage == Usage(chunks[-1].usage.prompt_tokens, 5, chunks[-1].usage.prompt_tokens + 5)
    assert any(c.finish_reason == "length" for c in chunks) and stream.endpoint == emulator.url
    assert stream.ttft_s is not None and stream.attempts == 1


async def test_n_in_one_request_when_supported(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url)})
    before = emulator.stats.requests
    res = await pool.client("m").chat(MSGS, {"max_tokens": 4}, n=3)
    assert emulator.stats.requests == before + 1 and emulator.bodies("m")[-1]["n"] == 3
    assert [c.index for c in res.choices] == [0, 1, 2] and len(set(res.texts)) == 3
    assert res.usage.completion_tokens == 12 and res.note == ""


async def test_n_emulated_with_separate_requests(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url, supports_n=False)})
    before = emulator.stats.requests
    res = await pool.client("m").chat(MSGS, {"max_tokens": 4, "seed": 5}, n=2)
    assert emulator.stats.requests == before + 2
    assert all("n" not in b for b in emulator.bodies("m")[-2:])
    assert sorted(b["seed"] for b in emulator.bodies("m")[-2:]) == [5, 6]  # distinct answers despite a seed
    assert len(res.choices) == 2 and res.texts[0] != res.texts[1]
    assert "n emulated with 2 requests" in res.note and res.usage.completion_tokens == 8


async def test_server_ignoring_n_is_covered_by_separate_requests(emulator_factory, pool_of):
    emu = await emulator_factory(ignore_n=True)
    pool = await pool_of({"m": make_cfg(emu.url)})  # supports_n left at true: a misconfiguration
    res = await pool.client("m").chat(MSGS, {"max_tokens": 4, "seed": 1}, n=3)
    assert len(res.choices) == 3 and len(set(res.texts)) == 3 and all(res.texts)
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert "returned 1 of 3 choices" in res.note and emu.stats.requests == 3


async def test_server_ignoring_n_keeps_the_choices_that_answered(emulator_factory, pool_of):
    """partial_ok (the gateway's Sample): a failed separate request leaves the choices that answered, its
    error listed, as where supports_n is false (seed 2: the n request answers, one of the two others fails)."""
    emu = await emulator_factory(ignore_n=True, error_rates={500: 0.5}, seed=2)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    res = await pool.client("m").chat(MSGS, {"max_tokens": 4, "seed": 1}, n=3, partial_ok=True)
    assert [c.index for c in res.choices] == [0, 1] and all(res.texts)
    assert [f.http_status for f in res.failures] == [500] and "1 of them failed" in res.note


async def test_unknown_model_is_a_user_error(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url)})
    with pytest.raises(UnknownBackendError) as exc:
        pool.client("nope")
    assert isinstance(exc.value, LookupError) and isinstance(exc.value, UserError)
    assert "nope" in str(exc.value) and "m" in str(exc.value)


async def test_api_key_from_env_and_file(emulator_factory, pool_of, tmp_path, monkeypatch):
    emu = await emulator_factory(api_key="k-123")
    monkeypatch.setenv("MOAA_TEST_KEY", "k-123")
    key_file = tmp_path / "key"
    key_file.write_text("k-123\n")
    pool = await pool_of({"env": make_cfg(emu.url, api_key_env="MOAA_TEST_KEY"),
                          "file": make_cfg(emu.url, api_key_file=str(key_file)),
                          "none": make_cfg(emu.url)})
    assert (await pool.client("env").chat(MSGS)).text
    assert (await pool.client("file").chat(MSGS)).text
    with pytest.raises(BackendError) as exc:
        await pool.client("none").chat(MSGS)
    assert exc.value.cause == "http_4xx" and exc.value.http_status == 401
    assert exc.value.message == "invalid or missing API key" and exc.value.attempts == 1
    monkeypatch.delenv("MOAA_TEST_KEY")
    with pytest.raises(UserError, match="MOAA_TEST_KEY"):
        BackendPool({"env": make_cfg(emu.url, api_key_env="MOAA_TEST_KEY")})
    with pytest.raises(UserError, match="api_key_file"):
        BackendPool({"f": make_cfg(emu.url, api_key_file=str(tmp_path / "missing"))})


# -- every failure becomes one typed BackendError naming backend, endpoint and cause ---------------
async def test_connection_refused(pool_of):
    url = free_port_url()
    pool = await pool_of({"gone": make_cfg(url)})
    with pytest.raises(BackendError) as exc:
        await pool.client("gone").chat(MSGS)
    err = exc.value
    assert (err.model, err.endpoint, err.cause, err.attempts) == ("gone", url, "connect", 3)
    assert "gone" in str(err) and url in str(err) and "connect" in str(err)


async def test_connect_timeout(pool_of):
    # A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    await asyncio.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        pool = await pool_of({"m": make_cfg(url, timeouts={"connect_s": 0.2}, retries={"max_attempts": 1})})
        with pytest.raises(BackendError) as exc:
            await pool.client("m").chat(MSGS)
        assert (exc.value.cause, exc.value.endpoint) == ("connect", url)
        assert "connect_s=0.2" in exc.value.message
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_4xx_with_openai_body_is_not_retried(emulator_factory, pool_of):
    emu = await emulator_factory(profiles={"bad": {"error_rates": {400: 1.0}}})
    pool = await pool_of({"bad": make_cfg(emu.url)})
    with pytest.raises(BackendError) as exc:
        await pool.client("bad").chat(MSGS)
    err = exc.value
    assert (err.cause, err.http_status, err.message, err.attempts) == ("http_4xx", 400, "emulated 400 error", 1)
    assert emu.stats.requests == 1 and err.exit_code == 2


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_with_openai_body_is_retried_then_typed(emulator_factory, pool_of, status):
    emu = await emulator_factory(error_rates={status: 1.0})
    pool = await pool_of({"m": make_cfg(emu.url)})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    err = exc.value
    assert (err.cause, err.http_status, err.message, err.attempts) == ("http_5xx", status, f"emulated {status} error", 3)
    assert emu.stats.requests == 3 and err.exit_code == 75 and err.retryable


async def test_stream_cut_short(emulator_factory, pool_of):
    emu = await emulator_factory(disconnect_after_chunks=2)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "stream_cut" and exc.value.endpoint == emu.url


async def test_in_stream_error_event(emulator_factory, pool_of):
    emu = await emulator_factory(error_after_chunks=1)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "http_5xx" and "error in stream" in exc.value.message


async def test_malformed_chunk(emulator_factory, pool_of):
    emu = await emulator_factory(malformed_after_chunks=1)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        async for _ in pool.client("m").stream_chat(MSGS):
            pass
    assert exc.value.cause == "malformed" and exc.value.model == "m"


async def test_malformed_non_streamed_answer(emulator_factory, pool_of):
    # A server that ignores stream=true answers JSON; a broken one is `malformed` too.
    emu = await emulator_factory()
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    emu.update(malformed_after_chunks=0)
    async with pool.client("m").stream_chat(MSGS) as stream:
        with pytest.raises(BackendError) as exc:
            async for _ in stream:
                pass
    assert exc.value.cause == "malformed"


async def test_first_token_timeout(emulator_factory, pool_of):
    emu = await emulator_factory(ttft_s=3.0)
    pool = await pool_of({"m": make_cfg(emu.url, timeouts={"first_token_s": 0.2}, retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "timeout" and "first_token_s=0.2" in exc.value.message


async def test_chunk_gap_timeout(emulator_factory, pool_of):
    emu = await emulator_factory(stall_after_chunks=2)
    pool = await pool_of({"m": make_cfg(emu.url, timeouts={"chunk_gap_s": 0.2}, retries={"max_attempts": 1})})
    stream = pool.client("m").stream_chat(MSGS)
    got = []
    with pytest.raises(BackendError) as exc:
        async for chunk in stream:
            got.append(chunk.text)
    assert len(got) == 2 and exc.value.cause == "timeout" and "chunk_gap_s=0.2" in exc.value.message


async def test_total_timeout(emulator_factory, pool_of):
    emu = await emulator_factory(tokens_per_s=20)  # steady chunks: no gap timeout, but a long answer
    pool = await pool_of({"m": make_cfg(emu.url, timeouts={"total_s": 0.3}, retries={"max_attempts": 1})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS, {"max_tokens": 100})
    assert exc.value.cause == "timeout" and "total_s=0.3" in exc.value.message


async def test_callers_deadline_bounds_everything(emulator_factory, pool_of):
    emu = await emulator_factory(tokens_per_s=10)
    pool = await pool_of({"m": make_cfg(emu.url)})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS, {"max_tokens": 50}, timeout=0.3)
    assert exc.value.cause == "timeout" and "deadline" in exc.value.message
    assert loop.time() - t0 < 2.0  # coarse: not the 5 s a full answer takes
    with pytest.raises(BackendError):
        await pool.client("m").chat(MSGS, timeout=0)


async def test_error_conversions():
    err = BackendError("m", "http://x/v1", "http_5xx", "boom", 502, 2)
    proto = backend_error_proto(err)
    assert isinstance(proto, common_pb2.BackendError)
    assert (proto.model, proto.endpoint, proto.cause, proto.http_status, proto.message, proto.attempts) == \
        ("m", "http://x/v1", "http_5xx", 502, "boom", 2)
    assert str(err) == "backend 'm' at http://x/v1: http_5xx HTTP 502: boom after 2 attempts"
    with pytest.raises(ValueError):
        BackendError("m", "", "weird", "?")
    assert error_message(b'{"error": {"message": "too long", "type": "BadRequestError"}}') == "too long"
    assert error_message(b'{"object": "error", "message": "old vllm"}') == "old vllm"
    assert error_message(b'{"detail": "fastapi"}') == "fastapi"
    assert error_message(b"<html>bad gateway</html>") == "<html>bad gateway</html>"
