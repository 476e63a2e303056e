"""The gateway's OpenAI-compatible HTTP door, called with the official `openai` client: a real gateway
(gRPC and HTTP in one process) over the in-process emulator."""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import openai
import pytest
from prometheus_client import REGISTRY

from moaa.services.config import ConfigError, parse_config
from tests.fixtures.gateway import backend, moa_config, request

FAST = {"ttft_s": 0.0}
TOKEN = "http-door-token-0123456789"


def client(gw, api_key: str = "unused", max_retries: int = 0, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gw.running.http_port}/v1", api_key=api_key,
                              max_retries=max_retries, timeout=30, **kw)


def ask(text: str = "What is a mixture of agents?") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def gw(http_gw):
    return http_gw


async def test_config_default_port_and_off():
    cfg = parse_config({"backends": {"m": {"urls": ["http://x/v1"]}}})
    assert cfg.gateway.http_port == 8080
    assert parse_config({"backends": {"m": {"urls": ["http://x/v1"]}}, "gateway": {"http_port": None}}).gateway.http_port is None


async def test_off_when_null(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    handle = await gateway_factory(moa_config(emu.url, ["a"], gateway={"http_port": None}))
    assert handle.running.http_port is None
    assert (await handle.stub.Generate(request(), timeout=10)).text  # gRPC alone still serves


async def test_recipe_answer_with_usage_and_extension(gw, caplog):
    caplog.set_level(logging.INFO, logger="moaa.http")
    raw = await client(gw).chat.completions.with_raw_response.create(
        model="moa", messages=ask(), extra_headers={"x-request-id": "rid-http-1"})
    resp = raw.parse()
    assert raw.headers["x-request-id"] == "rid-http-1" and resp.id == "chatcmpl-rid-http-1"
    assert resp.object == "chat.completion" and resp.model == "moa"
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    ext = resp.model_extra["moaa"]
    assert ext["kind"] == "recipe" and ext["recipe"] == "moa" and ext["request_id"] == "rid-http-1"
    assert [p["model"] for p in ext["layers"][0]["proposals"]] == ["a", "b"]
    assert all(p["text"] for p in ext["layers"][0]["proposals"]) and ext["failures"] == []
    assert ext["latency"]["total_s"] > 0 and len(ext["latency"]["layer_s"]) == 1
    per_model = {u["model"]: u["usage"] for u in ext["usage"]}
    assert set(per_model) == {"a", "b", "agg"}
    assert resp.usage.prompt_tokens == sum(u["prompt_tokens"] for u in per_model.values()) > 0
    assert resp.usage.completion_tokens == sum(u["completion_tokens"] for u in per_model.values()) > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # one log line per call, as gRPC's, with the request id and the transport; a metric series per transport
    (rec,) = [r for r in caplog.records if r.name == "moaa.http" and r.msg == "call"]
    assert (rec.request_id, rec.method, rec.transport, rec.code) == ("rid-http-1", "ChatCompletions", "http", "OK")
    assert REGISTRY.get_sample_value("moaa_rpc_calls_total", {
        "service": "gateway", "method": "ChatCompletions", "code": "OK", "transport": "http"}) >= 1


async def test_sampling_maps_onto_the_aggregator(gw):
    await client(gw).chat.completions.create(
        model="moa", messages=ask(), temperature=0.3, top_p=0.5, max_completion_tokens=5, stop=["zz"], seed=11,
        presence_penalty=0.1, frequency_penalty=0.2)
    agg = gw.emu.bodies("agg")[-1]
    assert {k: agg[k] for k in ("temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty",
                                "frequency_penalty")} == {
        "temperature": 0.3, "top_p": 0.5, "max_tokens": 5, "stop": ["zz"], "seed": 11, "presence_penalty": 0.1,
        "frequency_penalty": 0.2}
    assert "temperature" not in gw.emu.bodies("a")[-1]  # proposers keep the recipe's sampling
    # but draw from the call's seed, each its own (seed + index): the same seeded call gives the same answers
    assert (gw.emu.bodies("a")[-1]["seed"], gw.emu.bodies("b")[-1]["seed"]) == (11, 12)
    await client(gw).chat.completions.create(model="moa", messages=ask(), seed=2**63 - 1)   # int64 wraps
    assert (gw.emu.bodies("a")[-1]["seed"], gw.emu.bodies("b")[-1]["seed"]) == (2**63 - 1, -2**63)


async def test_what_eval_harnesses_send(gw):
    """Bodies as lm-eval 0.4.13 (local-chat-completions) and inspect-ai 0.3.285 send them: a task's gen_prefix
    as a last assistant message (OpenAI and vLLM take it; the backends' chat templates read it), and more stop
    strings than OpenAI's 4 (inspect passes its stop_seqs as they are; vLLM takes any number)."""
    url = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    prefixed = [{"role": "user", "content": "Question: What is 2+2?"}, {"role": "assistant", "content": "Answer:"}]
    lm_eval = {"messages": prefixed, "max_tokens": 32, "temperature": 0, "stop": ["\n\n"], "seed": 1234}
    stops = ["given", "Q:", "###", "END", "</s>", "STOP"]
    inspect = {"messages": ask(), "frequency_penalty": 0.1, "max_tokens": 20, "presence_penalty": 0.2, "seed": 7,
               "stop": stops, "temperature": 0.4, "top_p": 0.9}
    async with aiohttp.ClientSession() as s:
        for model, sees_it in (("moa", ("a", "b", "agg")), ("b", ("b",))):
            async with s.post(url, json={"model": model, **lm_eval}) as r:
                assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"], await r.text()
            for m in sees_it:   # the prefix reaches every model last, as sent
                assert gw.emu.bodies(m)[-1]["messages"][-1] == prefixed[-1], m
            async with s.post(url, json={"model": model, **inspect}) as r:
                assert r.status == 200, await r.text()
            assert gw.emu.bodies(sees_it[-1])[-1]["stop"] == stops
        async with s.post(url, json={**inspect, "model": "moa", "stop": [f"s{i}" for i in range(17)]}) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == "stop has 17 strings: send at most 16"


async def test_streaming_chunks_usage_and_done(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": {"tokens_per_s": 200}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    stream = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=True, max_tokens=8,
                                                      stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 8  # the aggregator's deltas, one per backend chunk
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["moaa"]["aggregator_model"] == "agg"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert text.strip()
    # on the wire, as OpenAI writes it: `usage: null` on every chunk before the usage chunk
    body = {"model": "moa", "messages": ask(), "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}}
    url = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        data = [json.loads(line[6:]) for line in (await r.text()).splitlines() if line.startswith("data: {")]
    assert all("usage" in d and d["usage"] is None for d in data[:-1]) and data[-1]["usage"]["total_tokens"] > 0
    # without include_usage there is no usage chunk
    stream = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=True, max_tokens=2)
    assert all(c.choices for c in [c async for c in stream])


async def test_sse_wire_format_ends_with_done(gw):
    url = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, json={"model": "moa", "messages": ask(), "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        body = (await r.read()).decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    # as OpenAI and vLLM send them: every choice says finish_reason and logprobs, null until the last
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert all(ch["finish_reason"] is None and ch["logprobs"] is None for ch in choices[:-1])
    assert choices[-1]["finish_reason"] in ("stop", "length") and choices[-1]["delta"] == {}
    assert all("usage" not in c and "role" not in ch["delta"] for c, ch in zip(chunks[1:], choices[1:]))


async def test_passthrough_backend_and_model_list(gw):
    models = await client(gw).models.list()
    kinds = {m.id: m.model_extra["moaa"]["kind"] for m in models.data}
    assert kinds == {"moa": "recipe", "a": "backend", "b": "backend", "agg": "backend"}
    assert all(m.created > 1.7e9 for m in models.data)   # when the gateway started, not 1970
    for m in models.data:  # GET /v1/models/{id}, as `client.models.retrieve` calls it
        assert (await client(gw).models.retrieve(m.id)) == m
    with pytest.raises(openai.NotFoundError) as err:
        await client(gw).models.retrieve("nope")
    assert err.value.body["code"] == "model_not_found" and "'nope'" in err.value.body["message"]
    raw = await client(gw).chat.completions.with_raw_response.create(model="b", messages=ask("plain question"),
                                                                     max_tokens=3)
    resp = raw.parse()   # the message as OpenAI writes it: openai-node types `refusal` as required
    assert {"refusal": None, "annotations": []}.items() <= json.loads(raw.text)["choices"][0]["message"].items()
    assert resp.choices[0].message.content and resp.model_extra["moaa"]["kind"] == "backend"
    assert resp.model_extra["moaa"]["layers"] == [] and resp.usage.total_tokens > 0
    body = gw.emu.bodies("b")[-1]
    assert body["messages"] == ask("plain question") and body["max_tokens"] == 3  # no references, nothing added
    stream = await client(gw).chat.completions.create(model="b", messages=ask(), stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    with pytest.raises(openai.BadRequestError) as err:  # MoA knobs on a single model: said, not ignored
        await client(gw).chat.completions.create(model="b", messages=ask(), extra_body={"moaa": {"first_k": 1}})
    assert err.value.body["param"] == "moaa" and "plain backend" in err.value.body["message"]
    # the backend's context_window bounds max_tokens on the door as on Sample (it was passed through)
    window = 4096   # the backends' default context_window
    for kw, field in (({"max_tokens": 10**6}, "max_tokens"), ({"max_completion_tokens": 10**6}, "max_completion_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            await client(gw).chat.completions.create(model="b", messages=ask(), **kw)
        assert err.value.body["param"] == field and f"use at most {window - 16}" in err.value.body["message"], err.value.body
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).responses.create(model="b", input="hi", max_output_tokens=10**6)
    assert f"use at most {window - 16}" in err.value.body["message"], err.value.body


async def test_model_named_with_a_slash(gw_emulators, gateway_factory):
    emu = await gw_emulators({"org/m": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["org/m"]))
    assert (await client(gw).models.retrieve("org/m")).model_extra["moaa"]["kind"] == "backend"
    assert (await client(gw).chat.completions.create(model="org/m", messages=ask())).model == "org/m"


@pytest.mark.parametrize("kw", [
    {"n": 1}, {"logprobs": False}, {"top_logprobs": 0}, {"tools": []}, {"tool_choice": "none"}, {"logit_bias": {}},
    {"parallel_tool_calls": False}, {"response_format": {"type": "text"}}, {"store": False}, {"modalities": ["text"]},
    {"user": "u-1", "metadata": {"team": "eval"}}, {"stream_options": {}}, {"verbosity": "medium"},
])
async def test_fields_at_their_unused_value_are_accepted(gw, kw):
    """What real clients send with the value that asks for nothing we lack (vLLM takes them too)."""
    resp = await client(gw).chat.completions.create(model="moa", messages=ask(), max_tokens=2, **kw)
    assert resp.choices[0].message.content


@pytest.mark.parametrize("kw, param", [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3.0}, "temperature"),
    ({"extra_body": {"top_k": 5}}, "top_k"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),   # no user turn at all
    ({"stop": ["a", ""]}, "stop"),
    ({"extra_body": {"moaa": {"min_proposers": 5}}}, "moaa"),
    # past the wire types of GenerateRequest: a 400, not a 500 from protobuf
    ({"seed": 2**63}, "seed"),
    ({"seed": -2**63 - 1}, "seed"),
    ({"max_tokens": 2**32}, "max_tokens"),
    ({"max_completion_tokens": 2**32}, "max_completion_tokens"),
    ({"extra_body": {"moaa": {"first_k": 2**32}}}, "moaa.first_k"),
    ({"extra_body": {"moaa": {"min_proposers": 2**32}}}, "moaa.min_proposers"),
    # per-chunk usage cannot be given (the engine counts tokens at the end): said, not ignored
    ({"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"messages": [*ask(), {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, *ask()]},
     "messages[1].tool_calls"),
    ({"messages": [*ask(), {"role": "assistant", "content": None, "refusal": "no"}, *ask()]}, "messages[1].refusal"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}]}, "messages[0].content[1].type"),  # message: "... is 'image_url': ... 'text'"
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"extra_body": {"stream": "maybe"}}, "stream"),  # fields named str... are fields, not a union's branch
    ({"stream": True, "stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),   # without stream: OpenAI and vLLM refuse it
    ({"max_completion_tokens": 10**6}, "max_completion_tokens"),       # over the window: named as sent
])
async def test_bad_requests_are_400_naming_the_field(gw, kw, param):
    args = {"model": "moa", "messages": ask(), **kw}
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).chat.completions.create(**args)
    assert err.value.status_code == 400
    e = err.value.body
    assert e["type"] == "invalid_request_error" and e["message"], e
    assert param in (e["param"], e["param"].split("[")[0]) and param in e["message"], e


async def test_history_as_the_sdk_gives_it_back(gw):
    """An answer's message appended to the history as the SDK dumps it (refusal, tool_calls... as null)."""
    first = await client(gw).chat.completions.create(model="b", messages=ask("one"), max_tokens=2)
    said = first.choices[0].message
    for turn in (said, said.model_dump(), said.model_dump(mode="json") | {"annotations": [], "tool_calls": []}):
        resp = await client(gw).chat.completions.create(model="b", messages=[*ask("one"), turn, *ask("two")])
        assert resp.choices[0].message.content
        assert gw.emu.bodies("b")[-1]["messages"][1] == {"role": "assistant", "content": said.content}


async def test_null_is_unset(gw):
    """Clients that serialize None send null for what they leave out: it means the default."""
    url = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    nulls = dict.fromkeys(["stream", "stream_options", "stop", "n", "user", "seed", "temperature", "top_p", "max_tokens",
                           "max_completion_tokens", "presence_penalty", "frequency_penalty", "response_format",
                           "tools", "tool_choice", "logprobs", "top_logprobs", "logit_bias", "metadata"])
    async with aiohttp.ClientSession() as s, s.post(url, json={"model": "moa", "messages": ask(), **nulls}) as r:
        assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]


async def test_body_not_json_is_400(gw):
    url = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as s, s.post(url, data=b"{not json", headers={"x-request-id": "r9"}) as r:
        assert r.status == 400 and r.headers["x-request-id"] == "r9"
        error = (await r.json())["error"]
        message = error.pop("message")   # with the parser's own words: where the body stops being JSON
        assert message.startswith("the request body is not JSON (") and "line 1 column 2" in message, message
        assert error == {"type": "invalid_request_error", "param": None, "code": None}
        async with s.post(url, json=[{"model": "moa"}]) as r:
            assert r.status == 400 and (await r.json())["error"]["message"] == "the request body must be a JSON object"
        # a lone UTF-16 surrogate (a string cut inside an emoji) and deep nesting: a 400, not a 500 SDKs retry
        lone = b'{"model": "moa", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
        deep = b'{"model": "moa", "messages": [], "metadata": ' + b"[" * 1100 + b"]" * 1100 + b"}"
        for path in ("chat/completions", "responses"):
            for data, says in ((lone, "surrogate"), (deep, "depth limit")):
                async with s.post(url.replace("chat/completions", path), data=data) as r:
                    error = (await r.json())["error"]
                    assert r.status == 400 and says in error["message"], (path, error)


async def test_openai_message_shapes_reach_the_backends_as_one_conversation(gw):
    """Text parts are joined by newlines (as vLLM joins them, and moaa's prompts); leading system and developer
    messages become the one system message, blank lines between; a later one is a 400 naming the request's own
    index."""
    parts = [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]
    system = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": [parts[0]]}]
    resp = await client(gw).chat.completions.create(model="b", messages=[*system, {"role": "user", "content": parts}])
    assert resp.choices[0].message.content
    assert gw.emu.bodies("b")[-1]["messages"] == [{"role": "system", "content": "Be brief.\n\nLine one."},
                                                   {"role": "user", "content": "Line one.\nLine two."}]
    await client(gw).chat.completions.create(model="moa", messages=[*system, *ask("q")])
    assert gw.emu.bodies("a")[-1]["messages"][0]["content"].startswith("Be brief.\n\nLine one.")
    late = [*system, *ask("q"), {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}, *ask("r")]
    with pytest.raises(openai.BadRequestError) as err:
        await client(gw).chat.completions.create(model="moa", messages=late)
    assert err.value.body["message"].startswith("messages[4] is a system message"), err.value.body


async def test_a_backends_own_finish_reason_is_one_openai_knows(gw_emulators, gateway_factory):
    """TGI ends with `eos_token`: clients with typed enums (and `== "stop"` checks) get `stop`; the backend's
    word stays in the `moaa` object."""
    emu = await gw_emulators({"a": FAST, "b": FAST, "agg": FAST | {"finish_reason": "eos_token"}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    for model in ("moa", "agg"):
        resp = await client(gw).chat.completions.create(model=model, messages=ask())
        assert resp.choices[0].finish_reason == "stop" and resp.model_extra["moaa"]["finish_reason"] == "eos_token"
        stream = await client(gw).chat.completions.create(model=model, messages=ask(), stream=True)
        finish = [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason]
        assert finish == ["stop"], model


async def test_unknown_model_is_404(gw):
    with pytest.raises(openai.NotFoundError) as err:
        await client(gw).chat.completions.create(model="nope", messages=ask())
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    assert "'nope'" in err.value.body["message"] and "moa" in err.value.body["message"]


async def test_auth_none_wrong_right(gw_emulators, gateway_factory, monkeypatch):
    monkeypatch.setenv("MOAA_TEST_HTTP_TOKENS", TOKEN)
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"auth": {"tokens_env": "MOAA_TEST_HTTP_TOKENS"}}))
    url = f"http://127.0.0.1:{gw.running.http_port}"
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json={"model": "moa", "messages": ask()}) as r:
            assert r.status == 401 and "missing bearer token" in (await r.json())["error"]["message"]
        for path in ("/health", "/health/ready"):  # probes need no token
            async with s.get(url + path) as r:
                assert r.status == 200, path
    with pytest.raises(openai.AuthenticationError) as err:
        await client(gw, api_key="wrong").chat.completions.create(model="moa", messages=ask())
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        await client(gw, api_key="wrong").models.list()
    resp = await client(gw, api_key=TOKEN).chat.completions.create(model="moa", messages=ask())
    assert resp.choices[0].message.content


async def test_cors_answers_only_the_origins_named(gw_emulators, gateway_factory, monkeypatch):
    """gateway.http_cors_origins: a named origin's preflight (no token, as browsers send it) gets the method and
    headers it asks for; its calls, streamed or refused, carry Allow-Origin and expose x-request-id, so the page
    can read the answer and the error; another origin, or a gateway with no origins named, gets no CORS."""
    monkeypatch.setenv("MOAA_TEST_HTTP_TOKENS", TOKEN)
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    page, auth = "http://localhost:3000", {"Authorization": f"Bearer {TOKEN}"}
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={
        "auth": {"tokens_env": "MOAA_TEST_HTTP_TOKENS"}, "http_cors_origins": [page]}))
    off = await gateway_factory(moa_config(emu.url, ["a"]))
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"}
    chat = f"http://127.0.0.1:{gw.running.http_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as s:
        async with s.options(chat, headers=preflight) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == page
            assert r.headers["Access-Control-Allow-Methods"] == "POST" and r.headers["Access-Control-Max-Age"] == "600"
            assert {h.strip() for h in r.headers["Access-Control-Allow-Headers"].lower().split(",")} == {
                "authorization", "content-type", "x-stainless-os"}
        for stream in (False, True):
            async with s.post(chat, json={"model": "moa", "messages": ask(), "stream": stream},
                              headers={"Origin": page, **auth}) as r:
                assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == page, stream
                assert "x-request-id" in r.headers["Access-Control-Expose-Headers"].split(",")
                assert (await r.text()).strip().endswith("[DONE]" if stream else "}")
        for method, path, status in (("POST", "/v1/chat/completions", 401), ("GET", "/v1/responses/resp_1", 404),
                                     ("GET", "/v1/models", 200)):
            async with s.request(method, chat.replace("/v1/chat/completions", path),
                                 headers={"Origin": page, **(auth if status != 401 else {})}) as r:
                assert r.status == status and r.headers["Access-Control-Allow-Origin"] == page, path
                assert r.headers["Vary"] == "Origin"  # the answer differs by origin: caches between must know
        async with s.options(chat, headers={**preflight, "Origin": "http://elsewhere.example"}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        async with s.post(chat, json={"model": "moa", "messages": ask()},
                          headers={"Origin": "http://elsewhere.example", **auth}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers  # the browser hides it
        async with s.options(f"http://127.0.0.1:{off.running.http_port}/v1/chat/completions", headers=preflight) as r:
            assert r.status == 405 and "Access-Control-Allow-Origin" not in r.headers


@pytest.mark.parametrize("origin", ["http://localhost:3000/", "localhost:3000", "https://app.example/chat", ""])
async def test_a_cors_origin_with_a_path_or_no_scheme_is_a_config_error(origin):
    with pytest.raises(ConfigError, match="not an origin.*no slash at the end"):
        parse_config({"backends": {"m": {"urls": ["http://x/v1"]}}, "gateway": {"http_cors_origins": [origin]}})
    assert parse_config({"backends": {"m": {"urls": ["http://x/v1"]}}, "gateway": {
        "http_cors_origins": ["*", "https://app.example:8443", "null", "tauri://localhost"]}})


async def test_over_max_in_flight_is_429_with_retry_after(gw_emulators, gateway_factory):
    emu = await gw_emulators({"stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stall"], gateway={"max_in_flight": 1}))
    first = asyncio.create_task(client(gw).chat.completions.create(model="moa", messages=ask()))
    for _ in range(100):
        if emu.stats.in_flight:
            break
        await asyncio.sleep(0.02)
    try:
        with pytest.raises(openai.RateLimitError) as err:
            await client(gw).chat.completions.create(model="moa", messages=ask())
        assert err.value.response.headers["retry-after"] == "1"
        assert "max_in_flight=1" in err.value.body["message"] and err.value.body["type"] == "rate_limit_error"
        # the gRPC door shares the limit
        import grpc
        with pytest.raises(grpc.aio.AioRpcError) as gerr:
            await gw.stub.Generate(request(), timeout=5)
        assert gerr.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)


async def test_too_few_proposers_is_503(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "bad": {"error_rates": {500: 1.0}}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "bad"], min_proposers=2))
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as err:
            r = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=stream)
            [c async for c in r]
        assert err.value.status_code == 503, stream
        assert err.value.body["type"] == "service_unavailable"
        assert "only 1 of 2 proposers answered" in err.value.body["message"] and "bad" in err.value.body["message"]


async def test_plain_backend_refusing_the_request_is_400(gw_emulators, gateway_factory):
    """A request passed through unchanged that the model refuses (vLLM's 400 for a prompt past its context)
    is the client's to change: a 400 with the model's message, not a 503 that SDKs retry."""
    emu = await gw_emulators({"a": FAST, "agg": {"error_rates": {400: 1.0}}, "down": {"error_rates": {500: 1.0}}})
    cfg = moa_config(emu.url, ["a"])
    cfg["backends"]["down"] = backend(emu.url, retries={"max_attempts": 1})
    gw = await gateway_factory(cfg)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await client(gw).chat.completions.create(model="agg", messages=ask(), stream=stream)
        assert "emulated 400 error" in err.value.body["message"] and "'agg'" in err.value.body["message"]
    with pytest.raises(openai.InternalServerError) as err:  # its own failures stay a 503
        await client(gw).chat.completions.create(model="down", messages=ask())
    with pytest.raises(openai.InternalServerError) as err:  # a recipe's aggregator gets our prompt: ours, a 503
        await client(gw).chat.completions.create(model="moa", messages=ask())
    assert err.value.status_code == 503 and "aggregator failed" in err.value.body["message"]


async def test_deadline_is_504(gw_emulators, gateway_factory):
    emu = await gw_emulators({"slow": {"ttft_s": 5}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["slow"]))
    with pytest.raises(openai.APIStatusError) as err:
        await client(gw).chat.completions.create(model="moa", messages=ask(), extra_body={"moaa": {"timeout_s": 0.3}})
    assert err.value.status_code == 504 and err.value.body["type"] == "timeout"
    for _ in range(100):  # the proposer's request was cancelled at the deadline
        if emu.stats.disconnects:
            break
        await asyncio.sleep(0.02)
    assert emu.stats.disconnects == 1


async def test_a_call_past_its_own_deadline_is_not_retried_by_the_sdk(gw_emulators, gateway_factory):
    """The SDKs retry every 5xx; a call cut by its own timeout_s would time out again, each try paying the
    backends: the 504 says x-should-retry: false, which the openai SDK honours."""
    emu = await gw_emulators({"slow": {"ttft_s": 5}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["slow"]))
    sdk = client(gw, max_retries=2)
    with pytest.raises(openai.APIStatusError) as err:
        await sdk.chat.completions.with_raw_response.create(
            model="moa", messages=ask(), extra_body={"moaa": {"timeout_s": 0.3}})
    assert err.value.status_code == 504 and err.value.response.headers["x-should-retry"] == "false"
    assert emu.stats.requests == 1   # one try: the proposer's one request


async def test_error_after_the_answer_started_is_an_event_in_the_stream(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": {"disconnect_after_chunks": 2}})
    gw = await gateway_factory(moa_config(emu.url, ["a"], backends={"agg": {"retries": {"max_attempts": 1}}}))
    stream = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=True, max_tokens=10)
    got = []
    with pytest.raises(openai.APIError) as err:
        async for c in stream:
            got.append(c)
    assert "aggregator failed" in str(err.value.message) and len(got) >= 2


def _text_delta(event: str) -> str:
    """The answer's text in one SSE event of either stream (chat chunk or Responses event), else ''."""
    data = next((line[len("data: "):] for line in event.split("\n") if line.startswith("data: {")), None)
    if data is None:
        return ""
    got = json.loads(data)
    if "choices" in got:
        return "".join(c["delta"].get("content") or "" for c in got["choices"])
    return got.get("delta", "") if got.get("type") == "response.output_text.delta" else ""


async def test_a_slow_stream_gets_headers_and_keep_alive_comments(gw_emulators, gateway_factory):
    """Proxies cut a connection silent for 60 s and Node's fetch gives up on headers after 300 s; a recipe's
    proposers can take longer than both before the first token. A stream silent for
    gateway.http_stream_keepalive_s gets its headers and an SSE comment, again each time as long; an error
    after that is an event in the stream (before it, its own status: test_deadline_is_504)."""
    emu = await gw_emulators({"slow": {"ttft_s": 1.5}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["slow"], gateway={"http_stream_keepalive_s": 0.2}))
    base = f"http://127.0.0.1:{gw.running.http_port}/v1"
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        for path, body in (("chat/completions", {"messages": ask()}), ("responses", {"input": "Hi?"})):
            t0 = loop.time()
            async with s.post(f"{base}/{path}", json={"model": "moa", "stream": True, **body}) as r:
                assert r.status == 200 and loop.time() - t0 < 1.3   # headers before the proposer's first token
                text = (await r.read()).decode()
            events = [e for e in text.split("\n\n") if e]
            assert events.count(": keep-alive") >= 3, events[:8]
            assert all(e == ": keep-alive" or e.startswith(("data: ", "event: ")) for e in events)
            # all of them before the answer's first words, which come 1.5 s later
            words = next(i for i, e in enumerate(events) if _text_delta(e))
            assert ": keep-alive" not in events[words:]
    # the SDKs skip comment lines: the stream parses as usual
    stream = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    # the deadline passes after the headers went out: an error event, then the end
    async with aiohttp.ClientSession() as s, s.post(f"{base}/chat/completions", json={
            "model": "moa", "messages": ask(), "stream": True, "moaa": {"timeout_s": 0.5}}) as r:
        assert r.status == 200
        events = [e for e in (await r.read()).decode().split("\n\n") if e]
    assert ": keep-alive" in events and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["type"] == "timeout"
    # null: headers with the first token, so the deadline is still a 504
    gw_off = await gateway_factory(moa_config(emu.url, ["slow"], gateway={"http_stream_keepalive_s": None}))
    with pytest.raises(openai.APIStatusError) as err:
        await client(gw_off).chat.completions.create(model="moa", messages=ask(), stream=True,
                                                     extra_body={"moaa": {"timeout_s": 0.5}})
    assert err.value.status_code == 504


async def test_client_disconnect_cancels_backend_requests(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True}, "agg": {"tokens_per_s": 20}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    # streaming: the client hangs up after the first words of the aggregator's answer
    stream = await client(gw).chat.completions.create(model="moa", messages=ask(), stream=True, max_tokens=200)
    async for c in stream:
        if c.choices and c.choices[0].delta.content:
            break
    await stream.close()
    for _ in range(200):
        if emu.stats.disconnects and not gw.running.guard.limiter.in_flight:
            break
        await asyncio.sleep(0.02)
    assert emu.stats.disconnects == 1 and emu.stats.in_flight == 0
    assert gw.running.guard.limiter.in_flight == 0
    # not streamed: hanging up while the proposers answer cancels them
    gw2 = await gateway_factory(moa_config(emu.url, ["a", "stall"]))
    task = asyncio.create_task(client(gw2).chat.completions.create(model="moa", messages=ask()))
    for _ in range(100):
        if emu.stats.in_flight:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(200):
        if emu.stats.disconnects == 2:
            break
        await asyncio.sleep(0.02)
    assert emu.stats.disconnects == 2 and emu.stats.in_flight == 0
    assert REGISTRY.get_sample_value("moaa_rpc_calls_total", {
        "service": "gateway", "method": "ChatCompletions", "code": "CANCELLED", "transport": "http"}) >= 1


async def test_gateway_serve_http_port_errors_are_one_line(gw_emulators, tmp_path):
    import socket
    import subprocess
    import sys

    import yaml

    emu = await gw_emulators({"a": FAST, "agg": FAST})
    path = tmp_path / "moaa.yaml"
    path.write_text(yaml.safe_dump(moa_config(emu.url, ["a"])))
    cmd = [sys.executable, "-m", "moaa.cli.main", "gateway", "serve", "--config", str(path)]
    bad = subprocess.run([*cmd, "--http-port", "70000"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--http-port 70000 is out of range" in bad.stderr and bad.stderr.count("\n") == 1
    # the HTTP port taken: one line, non-zero, no traceback
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        busy = subprocess.run([*cmd, "--http-port", str(taken)], capture_output=True, text=True, timeout=60)
    last = busy.stderr.strip().splitlines()[-1]
    assert busy.returncode == 2 and last.startswith("moaa: error: cannot serve HTTP on 127.0.0.1:") and "http_port" in last
    assert "Traceback" not in busy.stderr


async def test_unknown_route_and_too_large_body(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a"], gateway={"max_request_bytes": 2048}))
    base = f"http://127.0.0.1:{gw.running.http_port}"
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/v1/embeddings") as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.post(base + "/v1/completions", json={"model": "moa", "prompt": "Hi"}) as r:  # the legacy API
            err = (await r.json())["error"]
            assert r.status == 404 and "chat models only" in err["message"] and "is_chat_model" in err["message"]
        for method in ("GET", "PUT", "OPTIONS", "HEAD"):  # 405 in JSON, with the Allow header HTTP requires
            async with s.request(method, base + "/v1/chat/completions") as r:
                assert r.status == 405 and r.headers["Allow"] == "POST", method
                assert method == "HEAD" or (await r.json())["error"]["type"] == "invalid_request_error"
        body = {"model": "moa", "messages": ask("x" * 5000)}
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            err = (await r.json())["error"]
            assert r.status == 413 and "2048" in err["message"], err
        async with s.post(base + "/v1/chat/completions", json={"model": "moa", "messages": ask()},
                          headers={"x-request-id": "x" * 500}) as r:
            assert r.status == 200 and len(r.headers["x-request-id"]) == 16  # unusable id replaced
