"""The Responses API (`POST /v1/responses`) on the gateway's HTTP door, as our users' tools call it: the
`openai` SDK (`client.responses.create`, streamed, the `responses.stream` helper, sync and async),
langchain-openai's `ChatOpenAI(use_responses_api=True)` and openai-agents' `OpenAIResponsesModel`, each
against a real gateway over the in-process emulator. Every object and event is also validated strictly
against the SDK's own types, so none of them would fall back to a raw dict."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fixtures.gateway import http_calls, moa_config
from tests.fixtures.gateway import openai_base_url as base_url
from tests.fixtures.gateway import openai_client as client
from tests.fixtures.waiting import wait_for

FAST = {"ttft_s": 0.0}
TOKEN = "responses-door-token-0123456789"
EVENTS = TypeAdapter(ResponseStreamEvent)


def calls(code: str) -> float:
    return http_calls(code, "Responses")


async def post(gw, body: dict, headers: dict | None = None) -> tuple[int, dict | list, dict]:
    """A raw POST /v1/responses: (status, JSON body or the SSE events' data, headers)."""
    async with aiohttp.ClientSession() as s, s.post(base_url(gw) + "/responses", json=body, headers=headers) as r:
        if r.content_type == "text/event-stream":
            text = await r.text()
            return r.status, [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")], \
                dict(r.headers)
        return r.status, await r.json(), dict(r.headers)


@pytest.fixture
def gw(http_gw):
    return http_gw


# -- the openai SDK ------------------------------------------------------------------------------------

async def test_string_input_answers_a_response(gw):
    raw = await client(gw).responses.with_raw_response.create(
        model="moa", input="What is a mixture of agents?", extra_headers={"x-request-id": "rid-resp-1"})
    resp = raw.parse()
    assert raw.headers["x-request-id"] == "rid-resp-1" and resp.id == "resp_rid-resp-1"
    assert resp.object == "response" and resp.status == "completed" and resp.model == "moa"
    assert resp.output_text and resp.output[0].type == "message" and resp.output[0].id == "msg_rid-resp-1"
    assert resp.output[0].content[0].type == "output_text" and resp.output[0].content[0].annotations == []
    u = resp.usage
    assert u.input_tokens > 0 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == 0 and u.output_tokens_details.reasoning_tokens == 0
    ext = resp.model_extra["moaa"]  # the chat path's extension object, the same here
    assert ext["kind"] == "recipe" and [p["model"] for p in ext["layers"][0]["proposals"]] == ["a", "b"]
    assert sum(m["usage"]["prompt_tokens"] for m in ext["usage"]) == u.input_tokens
    Response.model_validate(json.loads(raw.text))  # strict: every field of the SDK's type
    assert gw.emu.bodies("a")[-1]["messages"][-1] == {"role": "user", "content": "What is a mixture of agents?"}
    assert calls("OK") >= 1


async def test_message_list_with_instructions_and_sampling(gw):
    answer = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "MoA is many models.", "annotations": [], "logprobs": []}]}
    resp = await client(gw).responses.create(
        model="b", instructions="Be brief.", temperature=0.3, top_p=0.9, max_output_tokens=50,
        metadata={"team": "eval"}, user="u-1", safety_identifier="hash", store=True, prompt_cache_retention="24h",
        extra_body={"prompt_cache_options": {"mode": "implicit", "ttl": "30m"}},
        text={"format": {"type": "text"}, "verbosity": "medium"},
        input=[{"role": "developer", "content": "Answer in English."},
               {"role": "user", "content": [{"type": "input_text", "text": "Question:"}, {"type": "input_text", "text": "What is MoA?",
                                                                                        "prompt_cache_breakpoint": {"mode": "explicit"}}]},
               answer, {"role": "user", "content": "And DPO?"}])
    assert resp.output_text and resp.instructions == "Be brief." and resp.metadata == {"team": "eval"}
    assert resp.store is False and resp.max_output_tokens == 50  # nothing is stored, whatever was asked
    sent = gw.emu.bodies("b")[-1]
    assert sent["messages"] == [{"role": "system", "content": "Be brief.\n\nAnswer in English."},
                                {"role": "user", "content": "Question:\nWhat is MoA?"},  # parts: by newlines
                                {"role": "assistant", "content": "MoA is many models."},
                                {"role": "user", "content": "And DPO?"}]
    assert sent["temperature"] == 0.3 and sent["top_p"] == 0.9 and sent["max_tokens"] == 50


async def test_what_inspect_ai_sends_on_its_openai_route(gw):
    """inspect-ai 0.3.285's `openai/<model>` route asks a model it does not know for encrypted reasoning, with
    store=false: there is no reasoning to include, so nothing is refused. Logprobs, which the answer would have,
    stay a 400 (REFUSED). An input ending with the assistant's turn reaches the model as sent."""
    resp = await client(gw).responses.create(
        model="moa", include=["reasoning.encrypted_content"], store=False, max_output_tokens=16, temperature=0.3,
        input=[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi"}])
    assert resp.output_text and resp.status in ("completed", "incomplete")
    assert gw.emu.bodies("agg")[-1]["messages"][-1] == {"role": "assistant", "content": "Hi"}


async def test_max_output_tokens_cut_is_incomplete(gw):
    resp = await client(gw).responses.create(model="moa", input="Tell me everything.", max_output_tokens=2)
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete" and resp.output_text
    assert gw.emu.bodies("agg")[-1]["max_tokens"] == 2


async def test_moaa_fields_via_extra_body(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "stall"]))
    # first_k=1: the answer goes on with the first proposal, the stalled proposer is cancelled
    resp = await client(gw).responses.create(model="moa", input="hello",
                                             extra_body={"moaa": {"first_k": 1, "timeout_s": 20}})
    assert resp.output_text and [p["model"] for p in resp.model_extra["moaa"]["layers"][0]["proposals"]] == ["a"]
    with pytest.raises(openai.BadRequestError) as err:  # the chat path's checks, the same here
        await client(gw).responses.create(model="moa", input="hello", extra_body={"moaa": {"min_proposers": 3}})
    assert err.value.body["param"] == "moaa" and "min_proposers=3" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).responses.create(model="moa", input="hello", extra_body={"moaa": {"top_k": 3}})
    assert err.value.body["param"] == "moaa.top_k"


async def test_sync_client_off_the_loop(gw):
    sdk = openai.OpenAI(base_url=base_url(gw), api_key="unused", max_retries=0, timeout=30)
    resp = await asyncio.to_thread(sdk.responses.create, model="moa", input="hello")
    assert resp.output_text and resp.status == "completed"
    events = await asyncio.to_thread(lambda: list(sdk.responses.create(model="moa", input="hello", stream=True)))
    assert events[-1].type == "response.completed" and events[-1].response.output_text == resp.output_text


async def test_stream_event_sequence(gw):
    stream = await client(gw).responses.create(model="moa", input="What is a mixture of agents?", stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"]
    assert kinds[:4] == head and kinds[-4:] == tail, kinds
    assert set(kinds[4:-4]) == {"response.output_text.delta"} and len(kinds) > 9
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert text == events[-4].text == events[-3].part.text == done.output_text
    assert done.status == "completed" and done.usage.total_tokens > 0 and done.model_extra["moaa"]["kind"] == "recipe"
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert len({events[0].response.id, events[1].response.id, done.id}) == 1
    assert gw.emu.bodies("agg")[-1]["stream"] is True  # the aggregator's deltas are streamed through


async def test_stream_wire_format_is_the_sdks_types(gw):
    status, events, headers = await post(gw, {"model": "moa", "input": "hello", "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    for ev in events:
        EVENTS.validate_python(ev)  # strict: each event parses as its own SDK type
    body = {"model": "moa", "input": "hi", "stream": True}
    async with aiohttp.ClientSession() as s, s.post(base_url(gw) + "/responses", json=body) as r:
        lines = (await r.text()).splitlines()  # each event is named, as OpenAI names them
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names[0] == "response.created" and names[-1] == "response.completed" and "[DONE]" not in lines[-1]


async def test_stream_helper_final_response(gw):
    async with client(gw).responses.stream(model="moa", input="hello", instructions="Be brief.") as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.output_text == "".join(deltas) and final.status == "completed" and final.instructions == "Be brief."


async def test_stream_cut_at_max_output_tokens_ends_incomplete(gw):
    stream = await client(gw).responses.create(model="moa", input="hello", stream=True, max_output_tokens=2)
    events = [e async for e in stream]
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


async def test_a_content_filter_cut_is_incomplete(gw_emulators, gateway_factory):
    """The aggregator's backend ended with `content_filter`: OpenAI's `incomplete` with that reason, unary and
    streamed (the chat door says `finish_reason: content_filter` on the same path)."""
    emu = await gw_emulators({"a": FAST, "b": FAST, "agg": FAST | {"finish_reason": "content_filter"}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    resp = await client(gw).responses.create(model="moa", input="hello")
    assert resp.status == "incomplete" and resp.incomplete_details.reason == "content_filter"
    stream = await client(gw).responses.create(model="moa", input="hello", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == "content_filter"


# -- refused, with what to do --------------------------------------------------------------------------

REFUSED = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
    ({"conversation": "conv_1"}, "conversation", "whole conversation"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools", "free text"),
    ({"tool_choice": "auto"}, "tool_choice", "remove"),
    ({"background": True}, "background", "background"),
    ({"text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}}, "text.format", "JSON"),
    ({"text": {"format": {"type": "json_object"}}}, "text.format", "JSON"),
    ({"reasoning": {"effort": "low"}}, "reasoning", "remove"),
    ({"text": {"verbosity": "low"}}, "text.verbosity", "shorter answer"),
    ({"include": ["message.output_text.logprobs"]}, "include", "remove"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "42"}]}, "input[0]", "text"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": "msg_1"},  # @ai-sdk/openai's
                {"role": "user", "content": "And?"}]}, "input[1]", "store: false"),        # default 2nd turn
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/i.png"}]}]},
     "input[0].content[0]", "text only"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]", "text"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role", "input[0].role"),
    ({"input": []}, "input", "user message"), ({"input": ""}, "input", "input.content is empty"),
    ({"input": [{"role": "assistant", "content": "b"}]}, "input", "no user message"),
    ({"temperature": 3}, "temperature", "temperature"),
    ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens"),
    ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty", "unsupported field"),
]


@pytest.mark.parametrize("kw, param, hint", REFUSED)
async def test_refused_fields_are_400_naming_the_field(gw, kw, param, hint):
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).responses.create(**{"model": "moa", "input": "hello", **kw})
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and hint in body["message"], body


async def test_stored_responses_are_404(gw):
    sdk = client(gw)
    for call in (lambda: sdk.responses.retrieve("resp_1"), lambda: sdk.responses.delete("resp_1"),
                 lambda: sdk.responses.cancel("resp_1"), lambda: sdk.responses.input_items.list("resp_1")):
        with pytest.raises(openai.NotFoundError) as err:
            await call()
        assert "moaa stores no responses" in err.value.body["message"], err.value.body


async def test_unknown_model_and_auth(gw_emulators, gateway_factory, monkeypatch):
    monkeypatch.setenv("MOAA_TEST_RESP_TOKENS", TOKEN)
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_env": "MOAA_TEST_RESP_TOKENS"}}))
    refused = calls("UNAUTHENTICATED")
    status, body, _ = await post(gw, {"model": "moa", "input": "hello"})
    assert status == 401 and "missing bearer token" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        await client(gw, api_key="wrong").responses.create(model="moa", input="hello")
    with pytest.raises(openai.AuthenticationError):
        await client(gw, api_key="wrong").responses.retrieve("resp_1")
    assert calls("UNAUTHENTICATED") - refused == 2  # the two calls; a retrieve is no call
    with pytest.raises(openai.NotFoundError) as err:
        await client(gw, api_key=TOKEN).responses.create(model="nope", input="hello")
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert (await client(gw, api_key=TOKEN).responses.create(model="moa", input="hello")).output_text


# -- the chat path's limits and failures, the same here ---------------------------------------------

async def test_429_503_504_with_their_headers(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True}, "slow": {"ttft_s": 5},
                              "bad": {"error_rates": {500: 1.0}}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stall"], gateway={"max_in_flight": 1}))
    first = asyncio.create_task(client(gw).responses.create(model="moa", input="hello"))
    assert await wait_for(lambda: emu.stats.in_flight)
    with pytest.raises(openai.RateLimitError) as err:
        await client(gw).responses.create(model="moa", input="hello")
    assert err.value.response.headers["retry-after"] == "1"
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    gw2 = await gateway_factory(moa_config(emu.url, ["a", "bad"], min_proposers=2,
                                           backends={"bad": {"retries": {"max_attempts": 1}}}))
    for stream in (False, True):  # before the first delta, a real status even when streamed
        with pytest.raises(openai.InternalServerError) as err:
            await client(gw2).responses.create(model="moa", input="hello", stream=stream)
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
        assert "only 1 of 2 proposers answered" in err.value.body["message"]
    gw3 = await gateway_factory(moa_config(emu.url, ["slow"]))
    with pytest.raises(openai.APIStatusError) as err:
        await client(gw3).responses.create(model="moa", input="hello", extra_body={"moaa": {"timeout_s": 0.3}})
    assert err.value.status_code == 504 and err.value.response.headers["x-should-retry"] == "false"


async def test_error_after_the_stream_started_is_response_failed(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": {"disconnect_after_chunks": 2}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"retries": {"max_attempts": 1}}}))
    failed = calls("UNAVAILABLE")
    status, events, _ = await post(gw, {"model": "moa", "input": "hello", "stream": True, "max_output_tokens": 10})
    assert status == 200 and events[0]["type"] == "response.created"
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "server_error" and "aggregator failed" in last["response"]["error"]["message"]
    for ev in events:
        EVENTS.validate_python(ev)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert calls("UNAVAILABLE") - failed == 1


async def test_client_disconnect_cancels_backend_requests(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True}, "agg": {"tokens_per_s": 20}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    cancelled = calls("CANCELLED")
    stream = await client(gw).responses.create(model="moa", input="hello", stream=True, max_output_tokens=200)
    async for e in stream:
        if e.type == "response.output_text.delta":
            break
    await stream.close()
    assert await wait_for(lambda: emu.stats.disconnects == 1 and emu.stats.in_flight == 0
                        and not gw.running.guard.limiter.in_flight), emu.stats
    # not streamed: hanging up while a proposer answers cancels it
    gw2 = await gateway_factory(moa_config(emu.url, ["a", "stall"]))
    task = asyncio.create_task(client(gw2).responses.create(model="moa", input="hello"))
    assert await wait_for(lambda: emu.stats.in_flight)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await wait_for(lambda: emu.stats.disconnects == 2 and emu.stats.in_flight == 0), emu.stats
    assert calls("CANCELLED") - cancelled == 2


# -- langchain-openai and openai-agents ----------------------------------------------------------------

async def test_langchain_chat_openai_with_the_responses_api(gw):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(base_url=base_url(gw), api_key="unused", model="moa", max_retries=0, use_responses_api=True)
    msg = await asyncio.to_thread(llm.invoke, "What is a mixture of agents?")
    assert msg.text and msg.response_metadata["id"].startswith("resp_") and msg.usage_metadata["total_tokens"] > 0
    total = None
    async for chunk in llm.astream("hello"):
        total = chunk if total is None else total + chunk
    assert total.text and total.usage_metadata["total_tokens"] > 0


async def test_openai_agents_runner(gw):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    sdk = openai.AsyncOpenAI(base_url=base_url(gw), api_key="unused", max_retries=0)
    agent = agents.Agent(name="moa", instructions="Be brief.",
                         model=agents.OpenAIResponsesModel(model="moa", openai_client=sdk))
    result = await agents.Runner.run(agent, "What is a mixture of agents?")
    assert result.final_output and isinstance(result.final_output, str)
    assert gw.emu.bodies("a")[-1]["messages"][0] == {"role": "system", "content": "Be brief."}
    # the next turn: the history as the SDK gives it back (the answer as an output message item)
    again = await agents.Runner.run(agent, result.to_input_list() + [{"role": "user", "content": "And DPO?"}])
    assert again.final_output
    assert [m["role"] for m in gw.emu.bodies("a")[-1]["messages"]] == ["system", "user", "assistant", "user"]
    assert gw.emu.bodies("a")[-1]["messages"][2]["content"] == result.final_output
    streamed = agents.Runner.run_streamed(agent, "hello")
    kinds = {e.type async for e in streamed.stream_events()}
    assert streamed.final_output and "raw_response_event" in kinds
