"""The backend client against what real OpenAI-compatible servers send (vLLM, SGLang/TGI, hosted APIs), each
case emulated by `services/emulator`, through a real gateway or annotator where the outcome reaches a client.

A backend that fails is a failure (retried, reported with model, cause and HTTP status), never an abstention
or a skipped row; the status a client sees says whose fault it is: INVALID_ARGUMENT for a request the model
refuses as it stands (vLLM's 400 for a prompt past its context), UNAVAILABLE for a backend outage."""
from __future__ import annotations

import asyncio
import email.utils
import time

import grpc
import openai
import pytest

from tests.fixtures.annotator import judge_config
from tests.fixtures.annotator import request as annotate_request
from moaa.services.backend import BackendError
from moaa.services.backend.errors import retry_after
from moaa.services.emulator import expected_text
from moaa.v1 import gateway_pb2
from tests.test_backend_client import MSGS, make_cfg
from tests.fixtures.gateway import moa_config, openai_client, request, user

LONG = " ".join(["word"] * 300)  # 300+ emulator tokens: past a 100-token context


async def _refused_on_both_doors(gw, prompt: str) -> tuple[str, str]:
    """The gRPC details and the HTTP door's 400 message for `prompt`, each checked to be the client's error
    (INVALID_ARGUMENT, a 400 the SDK does not retry); then a short prompt still goes through."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(prompt))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    http = openai_client(gw)
    with pytest.raises(openai.BadRequestError) as bad:
        await http.chat.completions.create(model="moa", messages=[{"role": "user", "content": prompt}])
    await http.close()
    resp = await gw.stub.Generate(request("short question"))
    assert resp.text and not resp.failures
    return err.value.details(), bad.value.body["message"]


async def test_prompt_past_every_proposers_context_is_invalid_argument(gw_emulators, gateway_factory):
    """vLLM answers 400 "This model's maximum context length is ..." for a prompt past its context. When every
    layer-1 proposer refuses the client's own conversation, retrying cannot help: INVALID_ARGUMENT with the
    model's message (gRPC and the HTTP door alike), not UNAVAILABLE; and the refusal is not retried."""
    emu = await gw_emulators(profiles={"a": {"max_model_len": 100}, "b": {"max_model_len": 100}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    msg, http = await _refused_on_both_doors(gw, LONG)
    assert "maximum context length is 100 tokens" in msg and "HTTP 400" in msg and "a (" in msg and "b (" in msg
    assert emu.stats.requests == 2 + 2 + 3  # gRPC, HTTP: one each, a refusal is not retried; the short prompt
    assert "maximum context length is 100 tokens" in http


async def test_aggregator_refusing_the_conversation_with_its_references_cut_is_invalid_argument(
        gw_emulators, gateway_factory):
    """Proposers with room, an aggregator whose 300-token context (configured, so moaa cuts the references to
    fit) the conversation alone fills: what is over is the client's, so INVALID_ARGUMENT (a 400 on the HTTP
    door), not an UNAVAILABLE that clients retry, paying the proposers each time. A short prompt goes through."""
    emu = await gw_emulators(profiles={"agg": {"max_model_len": 300}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"], backends={"agg": {"context_window": 300}}))
    msg, http = await _refused_on_both_doors(gw, LONG)
    assert "aggregator 'agg' refused" in msg and "maximum context length is 300 tokens" in msg, msg
    assert "shorten the conversation or lower max_tokens" in msg and "aggregator 'agg' refused" in http, msg


async def test_sample_of_a_prompt_past_the_context_is_invalid_argument(gw_emulators, gateway_factory):
    emu = await gw_emulators(profiles={"a": {"max_model_len": 100}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Sample(gateway_pb2.SampleRequest(model="a", n=2, messages=user(LONG)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "maximum context length is 100 tokens" in err.value.details()


async def test_a_400_for_anything_but_the_length_stays_unavailable(gw_emulators, gateway_factory, judge_emulator,
                                                                 annotator_factory):
    """A 400 for a parameter the server does not take (hosted OpenAI: `max_tokens` on a reasoning model) is
    our config's doing, not the client's: the item stays a failure to retry, never an 'invalid' row."""
    emu = await gw_emulators(error_rates={400: 1.0})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request("short question"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    stub = await annotator_factory(judge_config(judge_emulator.url, {"a": 'keyword:paris@error_rates={"400":1}'}))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "HTTP 400" in err.value.details()


def test_too_long_is_read_from_each_servers_wording():
    for status, message in [
            (400, "This model's maximum context length is 4096 tokens. However, your prompt contains 5000 input tokens"),
            (400, "The input (5000 tokens) is longer than the model's context length (4096 tokens)."),
            (400, "the request exceeds the available context size, try increasing it"),
            (422, "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 5000"),
            (413, "Prompt is too long")]:
        assert BackendError("m", "", "http_4xx", message, status).too_long, message
    for status, message in [(400, "Unsupported parameter: 'max_tokens' is not supported with this model."),
                            (401, "maximum context length"), (400, "emulated 400 error")]:
        assert not BackendError("m", "", "http_4xx", message, status).too_long, message


async def test_proposers_refusing_and_failing_together_stay_unavailable(gw_emulators, gateway_factory):
    """Mixed causes (one refusal, one outage): the outage may pass, so the call is UNAVAILABLE."""
    emu = await gw_emulators(profiles={"a": {"max_model_len": 100}, "b": {"error_rates": {500: 1.0}}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(LONG))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()


async def test_judges_refusing_the_prompt_is_invalid_argument_not_a_retry(judge_emulator, annotator_factory):
    """Judges whose backends refuse the judging prompt (candidates past the judge's context): no retry makes
    them answer, so the item is INVALID_ARGUMENT naming the judges and the model's message, never an
    abstention and never 'retry when the backends are back'."""
    cfg = judge_config(judge_emulator.url, {"a": "keyword:paris@max_model_len=100",
                                            "b": "keyword:paris@max_model_len=100"}, mode="pointwise", combine="mean")
    stub = await annotator_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(annotate_request(["Paris. " + LONG, "Rome."]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    msg = err.value.details()
    assert "maximum context length is 100 tokens" in msg and "a (m-a: http_4xx HTTP 400" in msg
    assert "retry when" not in msg


# -- hosted APIs: the wait a 429 / 503 asks for ---------------------------------------------------------

@pytest.mark.parametrize("style,status,wait,least", [
    ("seconds", 429, 0.4, 0.4), ("ms", 429, 0.4, 0.4), ("http-date", 429, 2, 1.0),
    ("ratelimit-reset", 429, 0.4, 0.4), ("seconds", 503, 0.4, 0.4)])
async def test_the_wait_a_refusal_asks_for_is_honoured(emulator_factory, pool_of, style, status, wait, least):
    """Hosted OpenAI sends `retry-after-ms` and `x-ratelimit-reset-requests` ("1m2.5s"); proxies send
    Retry-After as an HTTP date, and with 503s too. The retry waits that long (capped by backoff_max_s)."""
    emu = await emulator_factory(error_rates={status: 1.0}, retry_after_s=wait, retry_after_style=style)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 2, "backoff_max_s": 5.0})})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.attempts == 2 and exc.value.http_status == status
    assert loop.time() - t0 >= least


async def test_a_wait_past_the_callers_deadline_fails_at_once(emulator_factory, pool_of):
    emu = await emulator_factory(error_rates={429: 1.0}, retry_after_s=3, retry_after_style="ms")
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 3, "backoff_max_s": 5.0})})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS, timeout=1.0)
    assert exc.value.cause == "rate_limited" and exc.value.attempts == 1
    assert loop.time() - t0 < 0.5


def test_retry_after_reads_every_shape_hosted_apis_send():
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"Retry-After": "2"}) == 2.0
    assert 59 < retry_after({"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)}) <= 60
    assert retry_after({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m2.5s",
                        "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "6h0m0s"}) == 62.5
    assert retry_after({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms"}) == 0.02
    for unreadable in ({}, {"Retry-After": "soon"}, {"retry-after-ms": "x"},
                       {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1 minute"}):
        assert retry_after(unreadable) == 0.0


# -- what servers send on a 200 ----------------------------------------------------------------------------

UNICODE = [{"role": "user", "content": "Café, naïve, 東京, 🙂: what do they share?"}]


async def test_events_split_inside_a_utf8_character_keep_the_text(emulator_factory, pool_of):
    emu = await emulator_factory(echo=True, split_writes=True)
    pool = await pool_of({"m": make_cfg(emu.url)})
    res = await pool.client("m").chat(UNICODE)
    assert res.text == "user: " + UNICODE[0]["content"] and res.attempts == 1
    streamed = [c.text async for c in pool.client("m").stream_chat(UNICODE)]
    assert "".join(streamed) == res.text


async def test_gzip_encoded_answers_are_read(emulator_factory, pool_of):
    emu = await emulator_factory(gzip=True)
    pool = await pool_of({"m": make_cfg(emu.url)})
    res = await pool.client("m").chat(MSGS)
    assert res.text == expected_text({"messages": MSGS}) and res.usage.completion_tokens == 16


async def test_tgi_style_stream_without_ids_or_done_and_its_own_finish_reason(emulator_factory, pool_of):
    """TGI/SGLang: chunks without id/created, finish_reason 'eos_token', the stream just ends after usage."""
    emu = await emulator_factory(omit_ids=True, omit_done=True, finish_reason="eos_token")
    pool = await pool_of({"m": make_cfg(emu.url)})
    res = await pool.client("m").chat(MSGS)
    assert (res.text, res.finish_reason, res.attempts) == (expected_text({"messages": MSGS}), "eos_token", 1)
    assert res.usage.completion_tokens == 16
    assert pool.client("m").replicas.replicas[0].failures == 0


async def test_reasoning_deltas_are_not_the_answer(emulator_factory, pool_of):
    """vLLM with a reasoning parser streams `reasoning_content` deltas first; the answer is the content."""
    emu = await emulator_factory(reasoning_tokens=5)
    pool = await pool_of({"m": make_cfg(emu.url)})
    res = await pool.client("m").chat(MSGS)
    assert res.text == expected_text({"messages": MSGS})
    chunks = [c async for c in pool.client("m").stream_chat(MSGS)]
    assert "".join(c.text for c in chunks) == res.text and all(c.text or c.finish_reason or c.usage for c in chunks)
    # the reasoning tokens are completion tokens (as vLLM counts them), in the usage and the emulator's count
    before = emu.stats.tokens
    res = await pool.client("m").chat(MSGS, {"max_tokens": 12})
    assert res.usage.completion_tokens == 12 == emu.stats.tokens - before and res.finish_reason == "length"


async def test_an_html_page_with_200_is_a_malformed_answer_not_a_cut_stream(emulator_factory, pool_of):
    """A proxy's sign-in or error page answered with 200: the cause says the answer was not the protocol."""
    emu = await emulator_factory(html_200=True)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 2})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "malformed" and exc.value.attempts == 2, exc.value
    assert "text/html" in exc.value.message


async def test_an_error_object_answered_with_200_keeps_the_servers_message(emulator_factory, pool_of):
    """Some proxies and servers answer 200 with `{"error": {...}}`: the backend's error, with its message and
    the status its code names, retried like other backend errors; not a nameless `malformed` answer."""
    emu = await emulator_factory(error_200=True)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 2, "backoff_base_s": 0.01})})
    for call in (lambda: pool.client("m").chat(MSGS), lambda: _drain(pool.client("m").stream_chat(MSGS))):
        with pytest.raises(BackendError) as exc:
            await call()
        assert (exc.value.cause, exc.value.http_status, exc.value.attempts) == ("http_5xx", 502, 2), exc.value
        assert "upstream model server overloaded (emulated)" in exc.value.message


async def _drain(stream) -> None:
    async for _ in stream:
        pass


async def test_keep_alive_connections_closed_by_the_server_between_requests(emulator_factory, pool_of):
    """vLLM's uvicorn closes idle connections after 5 s, aiohttp keeps them 15 s: a closed pooled connection
    must not cost an attempt or count against the replica."""
    emu = await emulator_factory(keepalive_timeout_s=0.05)
    pool = await pool_of({"m": make_cfg(emu.url)})
    for _ in range(3):
        res = await pool.client("m").chat(MSGS)
        assert res.attempts == 1
        await asyncio.sleep(0.2)
    assert pool.client("m").replicas.replicas[0].failures == 0 and emu.stats.requests == 3


# -- through the services: a fault is a failure, never an abstention or a lost row -------------------------

FAULTS = {  # emulator settings -> the cause the client reports
    "disconnect_after_chunks=1": "stream_cut", "end_after_chunks=1": "stream_cut", "malformed_after_chunks=1": "malformed",
    "error_after_chunks=1": "http_5xx", "html_200=true": "malformed", "stall_before_headers=true": "timeout",
    "stall_after_chunks=1": "timeout", 'error_rates={"503":1}': "http_5xx"}
QUICK = {"timeouts": {"first_token_s": 0.5, "chunk_gap_s": 0.3}, "retries": {"max_attempts": 2, "backoff_base_s": 0.01}}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_judge_backend_fault_is_a_failure_never_an_abstention(judge_emulator, annotator_factory, fault):
    cfg = judge_config(judge_emulator.url, {"ok": "keyword:paris", "bad": f"keyword:paris@{fault}"},
                       mode="pointwise", combine="mean")
    cfg["backends"]["m-bad"].update(QUICK)
    stub = await annotator_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert f"bad (m-bad: {FAULTS[fault]}" in err.value.details() and "1 of 2 judges answered" in err.value.details()
    cfg["ensembles"]["e"]["min_judges"] = 1  # with a quorum of one: decided by the judge that answered
    stub = await annotator_factory(cfg)
    resp = await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert [j.judge for j in resp.judges] == ["ok"] and resp.chosen_id == "c0"
    assert resp.failures[0].model == "m-bad" and resp.failures[0].cause == FAULTS[fault]
    assert resp.failures[0].attempts == 2


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_proposer_backend_fault_is_a_reported_failure(gw_emulators, gateway_factory, fault):
    emu = await gw_emulators()
    cfg = moa_config(emu.url, ["a", "bad"], min_proposers=1)
    cfg["backends"]["bad"].update(served_model=f"bad@{fault}", **QUICK)
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(request("What is a mixture of agents?"))
    assert resp.text and [p.model for p in resp.layers[0].proposals] == ["a"]
    [failure] = resp.failures
    assert (failure.model, failure.cause, failure.attempts) == ("bad", FAULTS[fault], 2)
    if FAULTS[fault] == "http_5xx":
        assert failure.http_status in (500, 503)


async def test_a_pooled_connection_is_not_reused_past_a_uvicorn_servers_keep_alive(emulator_factory, pool_of):
    """uvicorn (vLLM, SGLang) drops connections idle for 5 s; aiohttp's pool keeps them 15 s, and a request
    sent as the server closes fails (aio-libs/aiohttp#9138). The client must not hand such a connection out."""
    emu = await emulator_factory(keepalive_timeout_s=5.0, keepalive_race=True)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1})})
    await pool.client("m").chat(MSGS)
    await asyncio.sleep(5.2)
    res = await pool.client("m").chat(MSGS)
    assert res.attempts == 1 and emu.stats.faults.get("keepalive_race", 0) == 0


async def test_max_completion_tokens_for_servers_that_refuse_max_tokens(emulator_factory, pool_of):
    """Hosted OpenAI's reasoning models refuse `max_tokens` (400, unsupported_parameter) and take only
    `max_completion_tokens`; transformers serve ignores `max_completion_tokens`. The backend's config says
    which one its server reads."""
    emu = await emulator_factory(reject_max_tokens=True)
    pool = await pool_of({"old": make_cfg(emu.url), "new": make_cfg(emu.url, max_tokens_field="max_completion_tokens")})
    with pytest.raises(BackendError) as exc:
        await pool.client("old").chat(MSGS, {"max_tokens": 4})
    assert exc.value.http_status == 400 and "max_completion_tokens" in exc.value.message and not exc.value.too_long
    res = await pool.client("new").chat(MSGS, {"max_tokens": 4})
    assert res.text == expected_text({"messages": MSGS}, max_tokens=4) and res.finish_reason == "length"
    body = emu.bodies("new")[-1]
    assert body["max_completion_tokens"] == 4 and "max_tokens" not in body


@pytest.mark.parametrize("gzip", [False, True])
async def test_a_server_that_ignores_stream_answers_json(emulator_factory, pool_of, gzip):
    emu = await emulator_factory(ignore_stream=True, gzip=gzip)
    pool = await pool_of({"m": make_cfg(emu.url)})
    res = await pool.client("m").chat(MSGS)
    assert (res.text, res.finish_reason, res.usage.completion_tokens) == (expected_text({"messages": MSGS}), "stop", 16)
    chunks = [c async for c in pool.client("m").stream_chat(MSGS)]
    assert "".join(c.text for c in chunks) == res.text and chunks[-1].usage.completion_tokens == 16


async def test_a_judge_whose_answer_is_cut_before_any_verdict_is_a_failure_not_an_abstention(
        judge_emulator, annotator_factory):
    """A reasoning model spends the whole max_tokens on `reasoning_content` (finish_reason length, empty content):
    no opinion was given, so the judge failed (cause naming the fix), with model and attempts; never an abstention."""
    cfg = judge_config(judge_emulator.url, {"ok": "keyword:paris", "bad": "keyword:paris@reasoning_tokens=40"},
                       mode="pointwise", combine="mean")
    cfg["ensembles"]["e"]["judges"][1]["sampling"] = {"temperature": 0.0, "max_tokens": 32}
    stub = await annotator_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    msg = err.value.details()
    assert "bad (m-bad: max_tokens" in msg and "max_tokens=32 before any verdict" in msg and "1 of 2 judges" in msg
    cfg["ensembles"]["e"]["min_judges"] = 1
    stub = await annotator_factory(cfg)
    resp = await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert [j.judge for j in resp.judges] == ["ok"] and resp.chosen_id == "c0"
    [failure] = resp.failures
    assert (failure.model, failure.cause, failure.attempts) == ("m-bad", "max_tokens", 1)
    assert "raise the judge's max_tokens" in failure.message
    # the same judge with room to answer after its reasoning gives its verdict
    cfg["ensembles"]["e"]["judges"][1]["sampling"]["max_tokens"] = 512
    stub = await annotator_factory(cfg)
    resp = await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    assert [j.judge for j in resp.judges] == ["ok", "bad"] and not resp.failures and resp.chosen_id == "c0"


async def test_a_judge_reply_cut_mid_verdict_says_so_in_its_abstention(judge_emulator, annotator_factory):
    """A reply cut at max_tokens after some text, unreadable even when asked again, is an abstention (a small
    model may ramble past any limit) whose reason names the limit and the setting that raises it."""
    cfg = judge_config(judge_emulator.url, {"ok": "keyword:paris", "bad": "keyword:paris"},
                       mode="pointwise", combine="mean")
    cfg["ensembles"]["e"]["judges"][1]["sampling"] = {"temperature": 0.0, "max_tokens": 3}
    stub = await annotator_factory(cfg)
    resp = await stub.Annotate(annotate_request(["Paris.", "Rome."]))
    bad = next(j for j in resp.judges if j.judge == "bad")
    reasons = {s.abstain_reason for s in bad.scores}
    assert bad.abstentions == 2 and not resp.failures, resp
    assert all("cut at max_tokens: raise the judge's max_tokens (judges[bad].sampling.max_tokens=3)" in r
               for r in reasons), reasons

