"""Retries, failover, circuit breaker, 429 backoff, rate limit, cancellation and health probes,
against real emulator servers."""
import asyncio
import time

import aiohttp
import pytest

from moaa.services.backend import BackendError
from moaa.services.backend.health import check_progress, probe_once
from moaa.services.backend.limits import AdaptiveLimit, make_throttler
from moaa.services.common.convert import models_info_proto
from tests.test_backend_client import MSGS, free_port_url, make_cfg
from tests.fixtures.waiting import wait_for


async def test_replicas_balanced_by_fewest_in_flight(emulator_factory, pool_of):
    a = await emulator_factory(tokens_per_s=40)
    b = await emulator_factory(tokens_per_s=40)
    pool = await pool_of({"m": make_cfg(a.url, b.url)})
    client = pool.client("m")
    ra, rb = client.replicas.replicas
    streams = [client.stream_chat(MSGS, {"max_tokens": 40}) for _ in range(8)]
    for s in streams:  # a stream is in flight once its first chunk arrived
        await s.__anext__()
    assert (ra.in_flight, rb.in_flight) == (4, 4)
    on_a = [s for s in streams if s.endpoint == a.url]
    for s in on_a:
        await s.aclose()
    assert await wait_for(lambda: ra.in_flight == 0)
    extra = [client.stream_chat(MSGS, {"max_tokens": 40}) for _ in range(3)]
    for s in extra:
        await s.__anext__()
    assert [s.endpoint for s in extra] == [a.url] * 3  # new work goes to the idle replica
    for s in streams + extra:
        await s.aclose()
    assert a.stats.requests + b.stats.requests == 11


async def test_failover_to_a_healthy_replica(emulator_factory, pool_of):
    bad = await emulator_factory(error_rates={503: 1.0})
    good = await emulator_factory()
    dead = free_port_url()
    pool = await pool_of({"m": make_cfg(dead, bad.url, good.url, retries={"max_attempts": 3})})
    for _ in range(4):
        res = await pool.client("m").chat(MSGS)
        assert res.endpoint == good.url and res.text
    assert good.stats.completed == 4


async def test_stream_retries_before_the_first_chunk_only(emulator_factory, pool_of):
    cut_early = await emulator_factory(disconnect_after_chunks=0)  # dies before any content
    good = await emulator_factory()
    pool = await pool_of({"m": make_cfg(cut_early.url, good.url, retries={"max_attempts": 2})})
    for _ in range(3):  # whichever replica goes first, the caller gets a whole answer
        stream = pool.client("m").stream_chat(MSGS)
        text = "".join([c.text async for c in stream])
        assert text and stream.endpoint == good.url


async def test_no_retry_once_streaming_started(emulator_factory, pool_of):
    cut_late = await emulator_factory(disconnect_after_chunks=3)
    good = await emulator_factory()
    pool = await pool_of({"m": make_cfg(cut_late.url, good.url, retries={"max_attempts": 3})})
    pool.client("m").replicas.replicas[1].begin = lambda: False  # keep the picture simple: count requests
    for _ in range(6):
        stream = pool.client("m").stream_chat(MSGS)
        try:
            texts = [c.text async for c in stream]
        except BackendError as err:
            assert err.cause == "stream_cut" and err.attempts == 1 and err.endpoint == cut_late.url
            assert len(stream.text.split()) == 3  # the caller saw 3 chunks; a retry would repeat them
        else:
            assert stream.endpoint == good.url and texts
    assert cut_late.stats.requests >= 1  # both replicas were used over six calls
    assert cut_late.stats.requests + good.stats.requests == 6


async def test_chat_retries_after_a_cut_since_the_caller_saw_nothing(emulator_factory, pool_of):
    cut_late = await emulator_factory(disconnect_after_chunks=3)
    good = await emulator_factory()
    pool = await pool_of({"m": make_cfg(cut_late.url, good.url, retries={"max_attempts": 2})})
    for _ in range(4):
        res = await pool.client("m").chat(MSGS, {"max_tokens": 6})
        assert res.endpoint == good.url and len(res.text.split()) == 6  # nothing doubled from the cut try


async def test_circuit_opens_and_recovers(emulator_factory, pool_of):
    emu = await emulator_factory(error_rates={500: 1.0})
    cfg = make_cfg(emu.url, retries={"max_attempts": 1}, circuit={"failure_threshold": 2, "reset_after_s": 0.3})
    pool = await pool_of({"m": cfg})
    client = pool.client("m")
    for _ in range(2):
        with pytest.raises(BackendError) as exc:
            await client.chat(MSGS)
        assert exc.value.cause == "http_5xx"
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "open"
    with pytest.raises(BackendError) as exc:
        await client.chat(MSGS)
    assert exc.value.cause == "circuit_open" and emu.stats.requests == 2  # refused without a request
    assert exc.value.endpoint == "" and emu.url in exc.value.message  # none reached (common.proto); named in the text
    emu.update(error_rates={})
    await asyncio.sleep(0.35)
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "half_open"
    assert (await client.chat(MSGS)).text  # the trial request succeeds and closes the circuit
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "closed"


async def test_short_caller_deadlines_do_not_open_the_circuit(emulator_factory, pool_of):
    emu = await emulator_factory(ttft_s=0.3)
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1},
                                        circuit={"failure_threshold": 2, "reset_after_s": 10})})
    for _ in range(3):
        with pytest.raises(BackendError) as exc:
            await pool.client("m").chat(MSGS, timeout=0.05)
        assert exc.value.cause == "timeout"
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "closed"
    assert (await pool.client("m").chat(MSGS)).text


async def test_half_open_trial_failure_reopens(emulator_factory, pool_of):
    emu = await emulator_factory(error_rates={500: 1.0})
    cfg = make_cfg(emu.url, retries={"max_attempts": 1}, circuit={"failure_threshold": 1, "reset_after_s": 0.2})
    pool = await pool_of({"m": cfg})
    with pytest.raises(BackendError):
        await pool.client("m").chat(MSGS)
    await asyncio.sleep(0.25)
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert exc.value.cause == "http_5xx"  # the trial went through and failed
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "open"


async def test_circuit_open_is_logged_once_per_opening_with_the_failures_that_opened_it(emulator_factory, pool_of,
                                                                                        caplog):
    """Half-open trials that fail keep the circuit open without another warning or a growing count (it once
    read 'after 75 failures'); after it closed, the next opening is logged again."""
    emu = await emulator_factory(error_rates={500: 1.0})
    cfg = make_cfg(emu.url, retries={"max_attempts": 1}, circuit={"failure_threshold": 2, "reset_after_s": 0.05})
    pool = await pool_of({"m": cfg})
    caplog.set_level("INFO", logger="moaa.backend")

    async def fail(times: int, wait: float = 0.0) -> None:
        for _ in range(times):
            await asyncio.sleep(wait)
            with pytest.raises(BackendError) as exc:
                await pool.client("m").chat(MSGS)
            assert exc.value.cause == "http_5xx"

    def opened() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "circuit open" in r.getMessage()]

    await fail(2)
    await fail(4, wait=0.07)  # each a half-open trial that fails
    assert len(opened()) == 1 and "circuit open after 2 consecutive failures" in opened()[0], opened()
    assert sum("trial request failed" in r.getMessage() for r in caplog.records) == 4
    emu.update(error_rates={})
    await asyncio.sleep(0.07)
    assert (await pool.client("m").chat(MSGS)).text  # closes it
    emu.update(error_rates={500: 1.0})
    await fail(2)
    assert len(opened()) == 2 and "after 2 consecutive failures" in opened()[1], opened()


async def test_429_halves_the_concurrency_cap_and_requests_still_succeed(emulator_factory, pool_of):
    emu = await emulator_factory(max_concurrency=2, ttft_s=0.05)
    cfg = make_cfg(emu.url, max_concurrency=16, retries={"max_attempts": 20, "backoff_base_s": 0.02,
                                                          "backoff_max_s": 0.1})
    pool = await pool_of({"m": cfg})
    client = pool.client("m")
    results = await asyncio.gather(*(client.chat(MSGS, {"max_tokens": 2}) for _ in range(12)))
    assert all(r.text for r in results)
    assert emu.stats.rejected > 0
    limit = client.replicas.replicas[0].limit
    assert limit.limit < 16  # backed off
    assert emu.stats.max_in_flight <= 2


async def test_rate_limited_error_after_attempts_and_retry_after(emulator_factory, pool_of):
    emu = await emulator_factory(error_rates={429: 1.0}, retry_after_s=0.05)
    pool = await pool_of({"m": make_cfg(emu.url, max_concurrency=8, retries={"max_attempts": 2})})
    with pytest.raises(BackendError) as exc:
        await pool.client("m").chat(MSGS)
    assert (exc.value.cause, exc.value.http_status, exc.value.attempts) == ("rate_limited", 429, 2)
    assert pool.client("m").replicas.replicas[0].limit.limit == 2  # 8 -> 4 -> 2
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "closed"  # 429 is not a replica fault


async def test_adaptive_limit_halves_and_regrows():
    lim = AdaptiveLimit(8)
    lim.on_rate_limited()
    lim.on_rate_limited()
    assert lim.limit == 2
    for _ in range(2):
        lim.on_success()
    assert lim.limit == 3
    for _ in range(100):
        lim.on_success()
    assert lim.limit == 8
    # waiting for a slot: the third acquire waits until a release
    lim = AdaptiveLimit(2)
    await lim.acquire()
    await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done() and lim.waiting == 1
    lim.release()
    await waiter
    assert lim.in_flight == 2
    cancelled = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert lim.waiting == 0 and lim.in_flight == 2


async def test_rate_limit_is_honoured(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url, rate_limit_per_s=20)})
    client = pool.client("m")
    t0 = time.monotonic()
    await asyncio.gather(*(client.chat(MSGS, {"max_tokens": 1}) for _ in range(30)))
    assert time.monotonic() - t0 >= 0.45  # 20 in the first window, 10 more need the next one
    assert make_throttler(None) is None
    slow = make_throttler(0.5)
    assert slow.rate_limit == 1 and slow.period == pytest.approx(2.0)


async def test_cancelled_stream_is_seen_by_the_backend(emulator_factory, pool_of):
    emu = await emulator_factory(tokens_per_s=20)
    pool = await pool_of({"m": make_cfg(emu.url)})
    stream = pool.client("m").stream_chat(MSGS, {"max_tokens": 100})
    async for _ in stream:
        break
    await stream.aclose()
    assert await wait_for(lambda: emu.stats.disconnects == 1)
    async with pool.client("m").stream_chat(MSGS, {"max_tokens": 100}) as s2:
        await s2.__anext__()
    assert await wait_for(lambda: emu.stats.disconnects == 2)
    async for _ in pool.client("m").stream_chat(MSGS, {"max_tokens": 100}):
        break  # no aclose(): dropping the stream closes it (asyncio finalizes the generator)
    assert await wait_for(lambda: emu.stats.disconnects == 3)
    task = asyncio.create_task(pool.client("m").chat(MSGS, {"max_tokens": 100}))
    await wait_for(lambda: emu.stats.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_for(lambda: emu.stats.disconnects == 4)
    assert pool.client("m").replicas.replicas[0].in_flight == 0
    assert pool.models_info()[0]["replicas"][0]["circuit"] == "closed"  # the caller left: no fault


async def test_probe_marks_a_hung_replica_unhealthy_although_health_says_200(emulator_factory, pool_of):
    hung = await emulator_factory(stall_before_headers=True)
    good = await emulator_factory()
    cfg = make_cfg(hung.url, good.url, health={"probe_interval_s": 0.05, "probe_timeout_s": 0.2})
    pool = await pool_of({"m": cfg}, probes=True)
    async with aiohttp.ClientSession() as http:
        async with http.get(hung.root + "/health") as r:
            assert r.status == 200
    replicas = pool.client("m").replicas.replicas
    assert await wait_for(lambda: not replicas[0].healthy and good.stats.probes > 0)
    assert replicas[1].healthy and replicas[1].last_probe_latency_s > 0
    info = pool.models_info()[0]["replicas"]
    assert info[0]["healthy"] is False and "probe timeout" in info[0]["last_error"]
    assert hung.stats.probes > 0 and hung.stats.requests == 0  # probes are not counted as traffic
    for _ in range(4):  # traffic avoids the unhealthy replica
        assert (await pool.client("m").chat(MSGS)).endpoint == good.url
    hung.update(stall_before_headers=False)
    assert await wait_for(lambda: replicas[0].healthy)


async def _failing_replica(emulator_factory, pool_of, threshold: int, reset_s: float):
    """An emulator answering 500 and the client of a one-replica backend after one failed call (no retries)."""
    emu = await emulator_factory(error_rates={500: 1.0})
    pool = await pool_of({"m": make_cfg(emu.url, retries={"max_attempts": 1},
                                        circuit={"failure_threshold": threshold, "reset_after_s": reset_s})})
    client = pool.client("m")
    with pytest.raises(BackendError):
        await client.chat(MSGS)
    return emu, client, client.replicas.replicas[0]


async def test_probe_settles_a_half_open_circuit(emulator_factory, pool_of):
    emu, client, replica = await _failing_replica(emulator_factory, pool_of, 1, 0.05)
    await asyncio.sleep(0.06)
    assert not await probe_once(client, replica) and replica.circuit == "open"
    emu.update(error_rates={})
    await asyncio.sleep(0.06)
    assert await probe_once(client, replica) and replica.circuit == "closed" and replica.healthy


async def test_live_requests_without_progress_mark_the_replica_unhealthy(emulator_factory, pool_of):
    emu = await emulator_factory(ttft_s=5.0)
    pool = await pool_of({"m": make_cfg(emu.url, timeouts={"first_token_s": 3.0, "chunk_gap_s": 0.1})})
    client = pool.client("m")
    replica = client.replicas.replicas[0]
    task = asyncio.create_task(client.chat(MSGS))
    await wait_for(lambda: replica.in_flight == 1)
    assert check_progress(client, replica) and replica.healthy
    await asyncio.sleep(0.15)
    assert not check_progress(client, replica) and not replica.healthy
    assert "no progress on 1 live requests" in replica.last_error
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_models_info_shape(emulator, pool_of):
    pool = await pool_of({"m": make_cfg(emulator.url, context_window=2048, max_concurrency=4)})
    (info,) = pool.models_info()
    assert info["name"] == "m" and info["served_model"] == "m" and info["context_window"] == 2048
    assert info["max_concurrency"] == 4
    assert info["replicas"] == [{"url": emulator.url, "healthy": True, "circuit": "closed", "in_flight": 0,
                                 "last_error": "", "last_probe_latency_s": 0.0}]
    (proto,) = models_info_proto(pool.models_info())
    assert proto.replicas[0].url == emulator.url and proto.context_window == 2048
    assert "m" in pool and pool.names == ["m"]


async def test_a_probe_success_neither_closes_an_open_circuit_nor_clears_a_failure_streak(emulator_factory, pool_of):
    """"Hi" answered says little about real requests (a replica that passes probes but fails long prompts):
    an open circuit stays open for reset_after_s, then one half-open trial decides."""
    emu, client, replica = await _failing_replica(emulator_factory, pool_of, 2, 30)
    emu.update(error_rates={})
    assert await probe_once(client, replica) and replica.failures == 1 and replica.circuit == "closed"
    emu.update(error_rates={500: 1.0})
    with pytest.raises(BackendError):
        await client.chat(MSGS)
    assert replica.circuit == "open"   # two failures in a row, a passing probe between them
    emu.update(error_rates={})
    assert await probe_once(client, replica) and replica.circuit == "open"
    with pytest.raises(BackendError) as err:
        await client.chat(MSGS)
    assert err.value.cause == "circuit_open"


async def test_the_rate_limit_holds_when_slots_free_together(pool_of):
    """Rate tokens are taken right before sending, not while waiting for a slot: when a backend finishes
    a batch at once, the requests that waited for slots still go out at rate_limit_per_s."""
    from aiohttp import web
    arrivals, t0 = [], time.monotonic()

    async def chat(request):
        arrivals.append(time.monotonic() - t0)
        if arrivals[-1] < 1.5:   # the first requests end together at 1.5 s, as a batch does
            await asyncio.sleep(1.5 - arrivals[-1])
        return web.json_response({"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        pool = await pool_of({"m": make_cfg(url, rate_limit_per_s=4, max_concurrency=2,
                                            timeouts={"first_token_s": 3.0, "total_s": 10.0})})
        await asyncio.gather(*(pool.client("m").chat(MSGS) for _ in range(10)))
    finally:
        await runner.cleanup()
    busiest = max(sum(1 for b in arrivals if a <= b < a + 0.95) for a in arrivals)
    assert len(arrivals) == 10 and busiest <= 4, arrivals


async def test_max_queued_bounds_the_requests_waiting_for_the_rate_limit(emulator, pool_of):
    """Requests waiting for a rate-limit token count in max_queued as those waiting for a slot do; the excess
    fails at once with queue_full, naming no endpoint (none was reached)."""
    pool = await pool_of({"m": make_cfg(emulator.url, rate_limit_per_s=2, max_queued=3,
                                        retries={"max_attempts": 1})})
    t0 = time.monotonic()
    results = await asyncio.gather(*(pool.client("m").chat(MSGS) for _ in range(8)), return_exceptions=True)
    full = [r for r in results if isinstance(r, BackendError)]
    assert len(full) == 3 and all(e.cause == "queue_full" and e.endpoint == "" for e in full), results
    assert emulator.stats.requests == 5 and time.monotonic() - t0 < 3.5
