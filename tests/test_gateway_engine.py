"""MoA engine behaviour through a real gateway against real (in-process) emulators on 127.0.0.1."""
from __future__ import annotations

import time

import grpc
import pytest

from moaa.v1 import common_pb2, gateway_pb2
from tests.fixtures.gateway import moa_config, request
from tests.fixtures.waiting import wait_for

FAST = {"ttft_s": 0.02}


async def test_two_layers_with_failing_and_stalling_proposers(gw_emulators, gateway_factory):
    emu = await gw_emulators({"p1": FAST, "p2": FAST, "bad": {"error_rates": {500: 1.0}},
                              "stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["p1", "p2", "bad", "stall"], layers=2, min_proposers=2,
                                          layer_deadline_s=1.0))
    t0 = time.monotonic()
    resp = await gw.stub.Generate(request(), timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 2 * 1.0 + 1.5  # two layer deadlines plus the aggregator, not the stall
    assert resp.text and resp.aggregator_model == "agg"
    assert [l.layer for l in resp.layers] == [1, 2]
    for layer in resp.layers:
        assert layer.stop_reason == "deadline"
        assert sorted(p.model for p in layer.proposals) == ["p1", "p2"]
        assert all(p.used for p in layer.proposals)
        causes = {f.model: f.cause for f in layer.failures}
        assert causes == {"bad": "http_5xx", "stall": "timeout"}
        assert layer.cancelled == 1
    assert {(f.model, f.cause) for f in resp.failures} == {("bad", "http_5xx"), ("stall", "timeout")}
    # layer 2 and the aggregator got the previous layer's answers, numbered, in the system prompt
    agg_body = emu.bodies("agg")[-1]
    system = agg_body["messages"][0]
    assert system["role"] == "system"
    for p in resp.layers[1].proposals:
        assert p.text.strip() in system["content"]
    assert "1. " in system["content"] and "2. " in system["content"]
    layer2_body = emu.bodies("p1")[-1]
    for p in resp.layers[0].proposals:
        assert p.text.strip() in layer2_body["messages"][0]["content"]
    assert agg_body["messages"][-1] == {"role": "user", "content": "What is a mixture of agents?"}
    # usage per model and the latency breakdown
    usage = {u.model: u for u in resp.usage}
    assert usage["p1"].requests == 2 and usage["p1"].usage.completion_tokens > 0
    assert usage["agg"].requests == 1
    assert len(resp.latency.layer_s) == 2 and resp.latency.total_s >= sum(resp.latency.layer_s)
    assert await wait_for(lambda: emu.stats.disconnects >= 2, timeout=5.0)  # both stalled requests were closed


async def test_first_k_does_not_wait_for_the_straggler(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {"ttft_s": 0.05}, "b": {"ttft_s": 0.1}, "c": {"ttft_s": 0.15},
                              "slow": {"ttft_s": 5.0}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b", "c", "slow"], first_k=3))
    t0 = time.monotonic()
    resp = await gw.stub.Generate(request(), timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0, elapsed  # near the third-fastest (0.15 s), not 5 s
    layer = resp.layers[0]
    assert layer.stop_reason == "first_k" and layer.cancelled == 1
    assert [p.model for p in layer.proposals] == ["a", "b", "c"]
    assert not resp.failures
    assert await wait_for(lambda: emu.stats.disconnects >= 1, timeout=5.0)


async def test_below_min_proposers_is_unavailable_naming_backends(gw_emulators, gateway_factory):
    emu = await gw_emulators({"ok": FAST, "bad1": {"error_rates": {500: 1.0}}, "bad2": {"error_rates": {503: 1.0}},
                              "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["ok", "bad1", "bad2"], min_proposers=2))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "bad1" in err.value.details() and "bad2" in err.value.details()
    assert "min_proposers=2" in err.value.details()
    assert not emu.bodies("agg")


async def test_an_empty_proposal_is_a_failure_not_an_answer(gw_emulators, gateway_factory):
    """A reasoning proposer that spends max_tokens on its reasoning answers nothing: that is a failure naming
    the setting to raise, and min_proposers does not count it as an answer."""
    emu = await gw_emulators({"ok": FAST, "thinker": {**FAST, "reasoning_tokens": 100}, "agg": FAST})
    cfg = moa_config(emu.url, ["ok", "thinker"], min_proposers=2)
    for proposer in cfg["recipes"]["moa"]["proposers"]:
        proposer["sampling"] = {"max_tokens": 50}
    gw = await gateway_factory(cfg)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "min_proposers=2" in err.value.details()
    assert "thinker (max_tokens: answer cut at max_tokens before any text: raise the recipe's proposers[1]" \
        in err.value.details(), err.value.details()
    resp = await gw.stub.Generate(request(min_proposers=1), timeout=10)
    assert [p.model for p in resp.layers[0].proposals] == ["ok"] and resp.text
    assert [(f.model, f.cause) for f in resp.failures] == [("thinker", "max_tokens")]


async def test_aggregator_failure_is_unavailable(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "agg": {"error_rates": {500: 1.0}}})
    gw = await gateway_factory(moa_config(emu.url, ["a"]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "aggregator" in err.value.details()


async def test_stream_events_in_order(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": {"ttft_s": 0.02}, "b": {"ttft_s": 0.1}, "bad": {"error_rates": {500: 1.0}},
                              "agg": {"ttft_s": 0.02, "tokens_per_s": 500}})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b", "bad"]))
    kinds, deltas, final = [], [], None
    async for ev in gw.stub.GenerateStream(request(aggregator_sampling=common_pb2.SamplingParams(max_tokens=12)),
                                           timeout=10):
        kinds.append(ev.WhichOneof("event"))
        if ev.HasField("delta"):
            deltas.append(ev.delta.text)
        if ev.HasField("final"):
            final = ev.final
    assert kinds[-1] == "final"
    n_first = kinds.index("delta")
    assert sorted(kinds[:n_first]) == ["failure", "proposal", "proposal"]
    assert set(kinds[n_first:-1]) == {"delta"} and len(deltas) >= 12  # streamed token by token
    assert final.text == "".join(deltas)
    assert final.finish_reason == "length"
    assert {u.model for u in final.usage} == {"a", "b", "bad", "agg"}
    assert final.latency.aggregator_ttft_s <= final.latency.aggregator_s


async def test_cancelled_call_closes_backend_streams(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "stall"]))
    call = gw.stub.GenerateStream(request())
    first = await call.read()
    assert first.proposal.model == "a"
    assert emu.stats.in_flight == 1
    call.cancel()
    assert await wait_for(lambda: emu.stats.disconnects >= 1 and emu.stats.in_flight == 0, timeout=5.0)


async def test_caller_deadline_bounds_backend_requests(gw_emulators, gateway_factory):
    emu = await gw_emulators({"stall": {"stall_before_headers": True}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["stall"]))
    t0 = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await gw.stub.Generate(request(), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3
    assert await wait_for(lambda: emu.stats.disconnects >= 1 and emu.stats.in_flight == 0, timeout=5.0)


async def test_multi_turn_and_system_message(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "b": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["a", "b"])
    cfg["recipes"]["moa"]["proposers"][0]["system_prompt"] = "You are terse."
    cfg["recipes"]["moa"]["aggregator"]["system_prompt"] = "You aggregate."
    gw = await gateway_factory(cfg)
    msgs = [common_pb2.Message(role="system", content="Answer in English."),
            common_pb2.Message(role="user", content="Hi"),
            common_pb2.Message(role="assistant", content="Hello! How can I help?"),
            common_pb2.Message(role="user", content="Explain MoA.")]
    resp = await gw.stub.Generate(gateway_pb2.GenerateRequest(messages=msgs), timeout=10)
    a_msgs = emu.bodies("a")[-1]["messages"]
    assert a_msgs[0] == {"role": "system", "content": "You are terse.\n\nAnswer in English."}
    assert a_msgs[1:] == [{"role": m.role, "content": m.content} for m in msgs[1:]]
    assert emu.bodies("b")[-1]["messages"][0] == {"role": "system", "content": "Answer in English."}
    agg = emu.bodies("agg")[-1]["messages"]
    assert agg[0]["content"].startswith("You aggregate.\n\nAnswer in English.\n\n")
    assert [m["role"] for m in agg] == ["system", "user", "assistant", "user"]
    for p in resp.layers[0].proposals:
        assert p.text.strip() in agg[0]["content"]


async def test_references_trimmed_to_the_aggregators_context_window(gw_emulators, gateway_factory):
    emu = await gw_emulators({"a": FAST, "b": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["a", "b"], backends={"agg": {"context_window": 300}})
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(request(
        proposer_sampling=common_pb2.SamplingParams(max_tokens=400),
        aggregator_sampling=common_pb2.SamplingParams(max_tokens=32)), timeout=10)
    layer = resp.layers[0]
    assert layer.references_trimmed and 0 < layer.reference_tokens < 300
    assert all(p.trimmed and p.trimmed_tokens > 0 and p.used for p in layer.proposals)
    system = emu.bodies("agg")[-1]["messages"][0]["content"]
    assert "tokens trimmed to fit the context window]" in system
    assert len(system) < 300 * 3 + 100  # within the safe estimate of the window


def _retry_later(status: int = 503) -> dict:
    """A model that always fails and asks for a 5 s wait: a caller is waiting to retry it for that long."""
    return {"error_rates": {status: 1.0}, "retry_after_s": 5.0}


RETRY_LATER = {"retries": {"max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 5.0}}


async def test_first_k_reports_a_proposer_that_failed_while_waiting_to_retry(gw_emulators, gateway_factory):
    """first_k stops the layer while a failed proposer waits to retry: its failure is reported as it was
    (cause, status, replica, attempts), not only counted as a late proposer."""
    emu = await gw_emulators({"a": {"ttft_s": 0.3}, "bad": _retry_later(), "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "bad"], first_k=1, backends={"bad": RETRY_LATER}))
    t0 = time.monotonic()
    resp = await gw.stub.Generate(request(), timeout=10)
    assert time.monotonic() - t0 < 3  # not the 5 s wait to retry
    assert emu.stats.errors[503] == 1
    layer = resp.layers[0]
    assert layer.stop_reason == "first_k" and layer.cancelled == 1
    assert [p.model for p in layer.proposals] == ["a"]
    for failures in (layer.failures, resp.failures):
        assert [(f.model, f.cause, f.http_status, f.endpoint, f.attempts) for f in failures] == [
            ("bad", "http_5xx", 503, emu.url, 1)]
        assert "first_k" in failures[0].message
    failures = [ev.failure async for ev in gw.stub.GenerateStream(request(), timeout=10) if ev.HasField("failure")]
    assert [(f.model, f.cause, f.http_status) for f in failures] == [("bad", "http_5xx", 503)]


async def test_layer_deadline_names_the_replica_and_attempts_it_cut(gw_emulators, gateway_factory):
    """A proposer cut at the layer deadline is a timeout naming the replica it waited for and the attempts
    made; one whose replica had failed before the deadline keeps that failure in the report."""
    emu = await gw_emulators({"a": FAST, "bad": _retry_later(), "slow": {"ttft_s": 5.0}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "bad", "slow"], layer_deadline_s=0.5,
                                          backends={"bad": RETRY_LATER}))
    resp = await gw.stub.Generate(request(), timeout=10)
    layer = resp.layers[0]
    assert layer.stop_reason == "deadline" and layer.cancelled == 2
    got = {f.model: f for f in resp.failures}
    assert set(got) == {"bad", "slow"} and len(layer.failures) == 2
    assert (got["slow"].cause, got["slow"].endpoint, got["slow"].attempts, got["slow"].http_status) == (
        "timeout", emu.url, 1, 0)
    bad = got["bad"]
    assert (bad.cause, bad.endpoint, bad.attempts, bad.http_status) == ("timeout", emu.url, 1, 503)
    assert "layer deadline of 0.5 s" in bad.message and "http_5xx HTTP 503" in bad.message, bad.message


async def test_first_k_uses_exactly_k_answers_that_arrive_together(gw_emulators, gateway_factory):
    """Proposers that answer in the same instant: only the first k answers are used and passed on, the others
    are late (cancelled, not used), every time."""
    together = {"ttft_s": 0.05}  # the emulator sends both answers in the same turn of its loop
    emu = await gw_emulators({"a": together, "b": together, "c": {"ttft_s": 0.3}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b", "c"], first_k=1))
    for _ in range(10):
        resp = await gw.stub.Generate(request(), timeout=10)
        layer = resp.layers[0]
        assert layer.stop_reason == "first_k" and layer.cancelled == 2
        assert len(layer.proposals) == 1 and layer.proposals[0].used and not resp.failures
        system = emu.bodies("agg")[-1]["messages"][0]["content"]
        assert "1. " + layer.proposals[0].text.strip() in system and "\n\n2. " not in system


async def test_first_k_counts_the_tokens_of_late_answers_received_whole(gw_emulators, gateway_factory):
    """An answer received whole but after the k-th is not used, and its tokens are still in the call's usage:
    usage adds up to what the backend served."""
    together = {"ttft_s": 0.05}
    emu = await gw_emulators({"a": together, "b": together, "slow": {"ttft_s": 5.0}, "agg": FAST})
    gw = await gateway_factory(moa_config(emu.url, ["a", "b", "slow"], first_k=1))
    matched = 0
    for _ in range(10):
        before = emu.stats.tokens
        resp = await gw.stub.Generate(request(), timeout=10)
        assert len(resp.layers[0].proposals) == 1 and resp.layers[0].cancelled == 2
        spent = {u.model: u.usage.completion_tokens for u in resp.usage}
        assert spent["slow"] == 0
        # on a busy machine one answer may go out after we cancelled it (the emulator has not seen the
        # close yet): what the emulator served, we did not get
        matched += spent["a"] > 0 and spent["b"] > 0 and sum(spent.values()) == emu.stats.tokens - before
    assert matched >= 8, matched


async def test_reference_report_describes_the_copy_the_trimmed_flags_describe(gw_emulators, gateway_factory):
    """Layer-2 proposers of different context windows get different copies of layer 1's answers: the layer's
    reference_tokens is that of the trimmed copy, the one its proposals' trimmed flags describe."""
    emu = await gw_emulators({"a": FAST, "tiny": FAST, "agg": FAST})
    cfg = moa_config(emu.url, ["a", "tiny"], layers=2, backends={"tiny": {"context_window": 400}})
    for proposer, max_tokens in zip(cfg["recipes"]["moa"]["proposers"], (200, 100)):
        proposer["sampling"] = {"max_tokens": max_tokens}
    gw = await gateway_factory(cfg)
    resp = await gw.stub.Generate(request(), timeout=10)
    layer = resp.layers[0]
    cut = [p for p in layer.proposals if p.trimmed]
    assert layer.references_trimmed and cut and all(p.trimmed_tokens > 0 for p in cut)
    assert "tokens trimmed to fit the context window]" in emu.bodies("tiny")[-1]["messages"][0]["content"]
    assert "tokens trimmed" not in emu.bodies("a")[-1]["messages"][0]["content"]  # a got them whole
    assert 0 < layer.reference_tokens <= 400 - 100  # what fits tiny's window beside its reply, not a's copy
