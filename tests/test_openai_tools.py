"""The HTTP door as our users' tools call it: langchain-openai's ChatOpenAI, litellm, and the `openai` SDK
paths tests/test_gateway_http.py does not cover (raw and streaming responses, concurrency, retries,
client timeouts, every chat field the SDK types), each against a real gateway over the in-process
emulator. litellm is not a test dependency (its boto3 pins python-dateutil<3, which kubernetes refuses):
its tests run where it is installed."""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from tests.fixtures.gateway import http_calls as calls
from tests.fixtures.gateway import moa_config
from tests.fixtures.gateway import openai_base_url as base_url
from tests.fixtures.gateway import openai_client as client
from tests.fixtures.waiting import wait_for

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm fetches a price list at import otherwise

FAST = {"ttft_s": 0.0}


def ask(text: str = "What is a mixture of agents?") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def gw(http_gw):
    return http_gw


# -- langchain-openai ----------------------------------------------------------------------------------

def chat_openai(gw, **kw):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(base_url=base_url(gw), api_key="unused", **{"model": "moa", "max_retries": 0, **kw})


async def test_langchain_invoke_ainvoke_and_history(gw):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    llm = chat_openai(gw)
    msg = await asyncio.to_thread(llm.invoke, "What is a mixture of agents?")  # sync: off the loop the gateway runs on
    assert msg.content and msg.response_metadata["model_name"] == "moa"
    assert msg.usage_metadata["total_tokens"] > 0 and msg.response_metadata["id"].startswith("chatcmpl-")
    # a multi-turn history with the answer as langchain writes it back, through a plain backend
    history = [SystemMessage("be brief"), HumanMessage("one"), msg, HumanMessage("two")]
    out = await chat_openai(gw, model="b").ainvoke(history)
    assert out.content
    sent = gw.emu.bodies("b")[-1]["messages"]
    assert sent == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one"},
                    {"role": "assistant", "content": msg.content}, {"role": "user", "content": "two"}]
    assert isinstance(out, AIMessage)


async def test_langchain_stream_and_astream_with_usage(gw):
    llm = chat_openai(gw, stream_usage=True)
    chunks = await asyncio.to_thread(lambda: list(llm.stream("hello")))
    total = sum(chunks[1:], chunks[0])
    assert total.content and total.usage_metadata["total_tokens"] > 0
    assert total.response_metadata["finish_reason"] in ("stop", "length")
    total = None
    async for chunk in llm.astream("hello"):
        total = chunk if total is None else total + chunk
    assert total.content and total.usage_metadata["total_tokens"] > 0
    assert gw.emu.bodies("agg")[-1]["stream"] is True  # the aggregator's deltas are streamed through


async def test_langchain_batch_and_abatch_with_concurrency(gw):
    llm = chat_openai(gw)
    prompts = [f"question {i}" for i in range(6)]
    answers = await asyncio.to_thread(llm.batch, prompts, config={"max_concurrency": 3})
    assert len(answers) == 6 and all(a.content for a in answers)
    answers = await llm.abatch(prompts, config={"max_concurrency": 6})
    assert len(answers) == 6 and all(a.content for a in answers)


async def test_langchain_bind_stop_and_max_tokens(gw):
    out = await chat_openai(gw).bind(stop=["zz"], max_tokens=5).ainvoke("hello")
    assert out.content
    agg = gw.emu.bodies("agg")[-1]
    assert agg["stop"] == ["zz"] and agg["max_tokens"] == 5


async def test_langchain_moaa_fields_via_extra_body(gw):
    out = await chat_openai(gw, extra_body={"moaa": {"first_k": 1}}).ainvoke("hello")
    assert out.content and out.response_metadata["id"].startswith("chatcmpl-")
    # langchain puts model_kwargs beside the SDK's own arguments, which the SDK refuses before sending
    with pytest.raises(TypeError, match="moaa"):
        await chat_openai(gw, model_kwargs={"moaa": {"first_k": 1}}).ainvoke("hello")


@pytest.mark.parametrize("method, param", [
    ("json_schema", "response_format"), ("json_mode", "response_format"), ("function_calling", "tools")])
async def test_langchain_structured_output_is_a_clear_400(gw, method, param):
    """A MoA answer is the aggregator's free text: the gateway cannot constrain it, so a structured-output
    request is refused naming the field, never answered with text that fails to parse."""
    from pydantic import BaseModel

    class Answer(BaseModel):
        answer: str

    with pytest.raises(openai.BadRequestError) as err:
        await chat_openai(gw).with_structured_output(Answer, method=method).ainvoke("hello")
    body = err.value.body
    assert body["param"] == param and param in body["message"] and "JSON" in body["message"], body


# -- litellm (where installed) -------------------------------------------------------------------------

async def test_litellm_completion_stream_and_acompletion(gw):
    litellm = pytest.importorskip("litellm")
    kw = {"model": "openai/moa", "api_base": base_url(gw), "api_key": "unused", "messages": ask(), "max_tokens": 4}
    resp = await asyncio.to_thread(litellm.completion, **kw)
    assert resp.choices[0].message.content and resp.usage.total_tokens > 0
    chunks = await asyncio.to_thread(lambda: list(litellm.completion(**kw, stream=True)))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    resp = await litellm.acompletion(**kw)
    assert resp.choices[0].message.content
    with pytest.raises(litellm.NotFoundError):
        await litellm.acompletion(**{**kw, "model": "openai/nope"})


# -- openai SDK ----------------------------------------------------------------------------------------

async def test_with_raw_and_streaming_response(gw):
    raw = await client(gw).chat.completions.with_raw_response.create(model="moa", messages=ask(), stream=True)
    assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers["x-request-id"]
    assert "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    async with client(gw).chat.completions.with_streaming_response.create(
            model="moa", messages=ask(), extra_headers={"x-request-id": "rid-sr"}) as resp:
        assert resp.status_code == 200 and resp.headers["x-request-id"] == "rid-sr"
        assert (await resp.parse()).choices[0].message.content
    async with client(gw).chat.completions.with_streaming_response.create(
            model="moa", messages=ask(), stream=True) as resp:
        lines = [line async for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


async def test_32_concurrent_calls_on_one_client(gw):
    c = client(gw)
    answers = await asyncio.gather(*[c.chat.completions.create(model="moa", messages=ask(f"q{i}"), max_tokens=4)
                                     for i in range(32)])
    assert len({a.id for a in answers}) == 32 and all(a.choices[0].message.content for a in answers)
    await c.close()


async def test_sdk_retries_429_after_retry_after(gw_emulators, gateway_factory):
    emu = await gw_emulators({"stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stall"], gateway={"max_in_flight": 1}))
    first = asyncio.create_task(client(gw).chat.completions.create(model="moa", messages=ask()))
    assert await wait_for(lambda: emu.stats.in_flight, 4)
    refused = calls("RESOURCE_EXHAUSTED")
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        await client(gw, max_retries=1).chat.completions.create(model="moa", messages=ask())
    assert time.monotonic() - t0 >= 0.9  # waited the door's Retry-After (1 s) before its one retry
    assert calls("RESOURCE_EXHAUSTED") - refused == 2
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_503_carries_retry_after(gw_emulators, gateway_factory):
    """Too few proposers answered is an outage the SDK retries (5xx): the door says when to."""
    emu = await gw_emulators({"a": FAST, "bad": {"error_rates": {500: 1.0}}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "bad"], min_proposers=2,
                                          backends={"bad": {"retries": {"max_attempts": 1}}}))
    with pytest.raises(openai.InternalServerError) as err:
        await client(gw).chat.completions.create(model="moa", messages=ask())
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"


async def test_client_timeout_cancels_backend_requests(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True},
                              "agg": {"stall_after_chunks": 2}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    # streamed: the client's read timeout cuts the answer after its first chunks
    stream = await client(gw, timeout=0.5).chat.completions.create(model="moa", messages=ask(), stream=True)
    got = []
    with pytest.raises((httpx.ReadTimeout, openai.APITimeoutError)):
        async for c in stream:
            got.append(c)
    assert got
    await stream.close()
    assert await wait_for(lambda: emu.stats.disconnects >= 1 and emu.stats.in_flight == 0
                        and not gw.running.guard.limiter.in_flight, 4), emu.stats
    # not streamed: the timeout passes while a proposer has not answered
    gw2 = await gateway_factory(moa_config(emu.url, ["a", "stall"]))
    with pytest.raises(openai.APITimeoutError):
        await client(gw2, timeout=0.5).chat.completions.create(model="moa", messages=ask())
    assert await wait_for(lambda: emu.stats.disconnects >= 2 and emu.stats.in_flight == 0
                        and not gw2.running.guard.limiter.in_flight, 4), emu.stats


# Every field of the SDK's `chat.completions.create` beyond the sampling ones: accepted and honoured,
# accepted and ignored where OpenAI documents it as not changing the answer, or a 400 naming it.
ACCEPTED = [
    {"user": "u-1"}, {"safety_identifier": "hash-of-user"}, {"prompt_cache_key": "k1"},  # identifiers and hints
    {"prompt_cache_retention": "24h"}, {"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}},
    {"messages": [{"role": "user", "content": [  # an explicit cache breakpoint on a text part
        {"type": "text", "text": "What is MoA?", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "30m"}}]}]},
    {"metadata": {"team": "eval"}},
    {"service_tier": "auto"}, {"service_tier": "default"},  # the one tier there is
    {"parallel_tool_calls": True},  # without tools it asks nothing (vLLM's default is true)
    {"prediction": {"type": "content", "content": "A mixture of agents is"}},  # a latency hint only
    {"prediction": {"type": "content", "content": [{"type": "text", "text": "A mixture"}]}},
    {"n": 1}, {"logprobs": False}, {"response_format": {"type": "text"}},
]
REFUSED = [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto"}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}},
     "response_format"),
    ({"service_tier": "flex"}, "service_tier"), ({"service_tier": "priority"}, "service_tier"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"verbosity": "low"}, "verbosity"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"prediction": {"type": "other", "content": "x"}}, "prediction.type"),
    ({"safety_identifier": "x" * 129}, "safety_identifier"),  # OpenAI's limit
    ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
    ({"messages": [{"role": "user", "content": "Sum?"}, {"role": "tool", "tool_call_id": "c1", "content": "42"}]},
     "messages[1].role"),  # a tool result: said as such, not as an unknown tool_call_id  # it would refuse answers: not ignored
]


@pytest.mark.parametrize("kw", ACCEPTED)
async def test_sdk_fields_accepted(gw, kw):
    resp = await client(gw).chat.completions.create(**{"model": "moa", "messages": ask(), "max_tokens": 2, **kw})
    assert resp.choices[0].message.content


@pytest.mark.parametrize("kw, param", REFUSED)
async def test_sdk_fields_refused_naming_the_field(gw, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).chat.completions.create(**{"model": "moa", "messages": ask(), **kw})
    body = err.value.body
    assert body["param"] == param and param.split(".")[0] in body["message"], body
