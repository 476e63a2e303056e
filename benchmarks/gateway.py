"""Gateway overhead and throughput against emulators, in one run.

    python benchmarks/gateway.py [--quick]

Four processes: the emulator (all models), the gateway, a do-nothing gRPC server, and this load
generator. Each MoA call has three proposers (time to first token 1.0 / 1.5 / 2.0 s plus up to 0.5 s
of seeded jitter, as real answers vary) and an aggregator (1.0 s + jitter), so the critical path is
slowest proposer + aggregator. For each concurrency (1, 64, 512) the same call pattern is run with
closed-loop clients whose first calls are spread over one call's duration (steady traffic, not one
synchronized burst): directly against the emulator (a plain aiohttp client fanning out and then
calling the aggregator: the bound, the emulator's own latency and capacity) and through the gateway
(gRPC Generate) and through the gateway's OpenAI-compatible HTTP door (POST /v1/chat/completions, the
same recipe, not streamed, with a plain aiohttp client). At 1 and 64 the same calls also go to a gRPC server that only sleeps as long as a
critical path: its "added" latency is the floor of one gRPC round trip on this machine. A last row
repeats 64 concurrent calls started in the same instant with no jitter: the worst case, where every
call queues behind the others on the gateway's one event loop.

Printed: p50/p99 of the gateway's added latency per call (client latency minus the slowest proposer
and the aggregator as the gateway timed them), the floor, and throughput (calls in flight / mean
latency, Little's law) at 512 concurrent calls as a ratio to the bound and to the configured latencies.

Then a GenerateBatch row (--batch-only runs just it): a stream of 512 items through a gateway with default
settings to an emulator whose every model has SLOTS slots (64, then 8) and answers in 1 s. Printed per
run: items/s; the share of the backends' capacity, computed from the configured slots and latency
(slots / 1 s items per second: each item takes one request of every model) and checked against the
emulator's own busy time (/emulator/stats busy_s, slot-seconds served / (slots x models x wall)); the
gateway's CPU per backend request (process CPU time, which other load on the machine barely changes,
unlike wall time); and the most requests queued at the gateway for a backend slot (moaa_backend_queued,
sampled) and the most items held by the stream (moaa_rpc_in_flight_high_water).

Targets: p50 added latency < 2 ms at 64 concurrent calls; throughput at 512 >= 90 % of the bound; the HTTP
door's p50 added latency at 64 within 1 ms of the gRPC path's.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from _procs import cpu_s as _cpu_s, run_emulator, run_server, spawn, write_json  # benchmarks/ is on sys.path when run as a script
import time

PROPOSERS = {"p1": 1.0, "p2": 1.5, "p3": 2.0}   # time to first token, seconds
AGGREGATOR = ("agg", 1.0)
TOKENS = 4
JITTER_S = 0.5
SYNC = "@ttft_jitter_s=0"  # model-name suffix: the emulator drops the jitter for this request


def _profiles() -> dict:
    """Each proposer's and the aggregator's first-token time, each with seeded jitter."""
    return {m: {"ttft_s": t, "ttft_jitter_s": JITTER_S} for m, t in {**PROPOSERS, AGGREGATOR[0]: AGGREGATOR[1]}.items()}


BATCH_ITEMS = 512
BATCH_LATENCY_S = 1.0


def _batch_config(url: str, slots: int) -> dict:
    """A gateway with default settings; each backend states its slots (max_concurrency), as a user would."""
    backend = {"urls": [url], "max_concurrency": slots, "health": {"probe_interval_s": 3600}}
    return {
        "backends": {m: backend for m in [*PROPOSERS, AGGREGATOR[0]]},
        "recipes": {"bench": {"proposers": [{"model": m} for m in PROPOSERS], "aggregator": {"model": AGGREGATOR[0]}}},
        "default_recipe": "bench", "gateway": {"port": 0, "metrics_port": 0},
    }


def _gauge(text: str, name: str) -> float:
    """Sum of a Prometheus gauge's samples over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def batch_row(slots: int, items: int = BATCH_ITEMS) -> dict:
    """One GenerateBatch stream of `items` items; the figures the module docstring lists."""
    import aiohttp
    import grpc

    from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    emu, url = spawn(run_emulator, {"record": False, "default_max_tokens": TOKENS, "ttft_s": BATCH_LATENCY_S,
                                    "max_concurrency": slots, "overflow": "queue"}, None)
    gw, (port, mport) = spawn(run_server, "gateway", _batch_config(url, slots), ("port", "metrics_port"))
    models = len(PROPOSERS) + 1
    try:
        async with aiohttp.ClientSession() as http, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.MoAGatewayStub(channel)
            msgs = [common_pb2.Message(role="user", content="q")]
            async with http.post(url.rsplit("/v1", 1)[0] + "/emulator/reset") as r:
                r.raise_for_status()
            peak_queued = 0.0
            done = False

            async def sample():
                nonlocal peak_queued
                while not done:
                    async with http.get(f"http://127.0.0.1:{mport}/metrics") as r:
                        peak_queued = max(peak_queued, _gauge(await r.text(), "moaa_backend_queued"))
                    await asyncio.sleep(0.5)  # each scrape costs the gateway CPU: seldom

            sampler = asyncio.create_task(sample())
            reqs = (gateway_pb2.BatchItem(id=str(i), request=gateway_pb2.GenerateRequest(messages=msgs))
                    for i in range(items))
            c0, t0 = _cpu_s(gw.pid), time.perf_counter()
            ok = 0
            async for res in stub.GenerateBatch(reqs, timeout=600):
                ok += res.HasField("response")
            wall, cpu = time.perf_counter() - t0, _cpu_s(gw.pid) - c0
            done = True
            await sampler
            async with http.get(url.rsplit("/v1", 1)[0] + "/emulator/stats") as r:
                busy = sum((await r.json())["busy_s"].values())
            async with http.get(f"http://127.0.0.1:{mport}/metrics") as r:
                held = _gauge(await r.text(), "moaa_rpc_in_flight_high_water")
    finally:
        gw.terminate()
        emu.terminate()
    bound = slots / BATCH_LATENCY_S  # items/s when every model's every slot is busy
    # a finite stream cannot reach it: the first phase's first wave has no aggregator work beside it and
    # the last wave's aggregators none beside them, so the best wall time is (items / slots + 1) phases
    best_wall = (items / slots + 1) * BATCH_LATENCY_S
    row = {"slots": slots, "items": items, "ok": ok, "wall_s": wall, "items_per_s": items / wall,
           "capacity_share": items / wall / bound, "of_best_wall": best_wall / wall, "busy_share": busy / (slots * models * wall),
           "cpu_ms_per_backend_request": cpu * 1e3 / (items * models), "peak_queued": peak_queued,
           "max_items_held": held}
    print(f"  GenerateBatch {items} items, {slots} slots per model, {BATCH_LATENCY_S:g} s per request: "
          f"{ok} answered, {row['items_per_s']:.1f} items/s = {row['capacity_share']:.1%} of capacity "
          f"({bound:.0f}/s), {row['of_best_wall']:.1%} of the best a {items}-item stream can do "
          f"(fill and drain: {best_wall:.1f} s); emulator busy {row['busy_share']:.1%}; gateway CPU "
          f"{row['cpu_ms_per_backend_request']:.3f} ms per backend request; at most {peak_queued:.0f} requests "
          f"queued for a backend slot, {held:.0f} items held", flush=True)
    return row


def _run_floor(q) -> None:
    """A do-nothing MoAGateway: Generate sleeps as long as a call's critical path and answers a canned
    result. What the benchmark measures against it is the cost of one gRPC round trip on this machine."""
    import random

    import grpc

    from moaa.v1 import gateway_pb2, gateway_pb2_grpc

    class Floor(gateway_pb2_grpc.MoAGatewayServicer):
        async def Generate(self, request, context):
            t0 = time.monotonic()
            await asyncio.sleep(max(PROPOSERS.values()) + random.random() * JITTER_S)
            t1 = time.monotonic()
            await asyncio.sleep(AGGREGATOR[1] + random.random() * JITTER_S)
            resp = gateway_pb2.GenerateResponse(text="x" * 32)
            layer = resp.layers.add(layer=1)
            for i in range(len(PROPOSERS)):
                layer.proposals.add(index=i, text="y" * 32, latency_s=t1 - t0)
            resp.latency.aggregator_s = time.monotonic() - t1
            return resp

    async def main():
        server = grpc.aio.server()
        gateway_pb2_grpc.add_MoAGatewayServicer_to_server(Floor(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        q.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _gateway_config(url: str) -> dict:
    backend = {"urls": [url], "max_concurrency": 4096, "health": {"probe_interval_s": 3600}}
    models = [*PROPOSERS, AGGREGATOR[0]]
    backends = {m: backend for m in models}
    backends.update({f"{m}-sync": {**backend, "served_model": m + SYNC} for m in models})

    def recipe(suffix: str) -> dict:
        return {"proposers": [{"model": m + suffix} for m in PROPOSERS], "aggregator": {"model": AGGREGATOR[0] + suffix},
                "min_proposers": 3}
    return {"backends": backends, "recipes": {"bench": recipe(""), "burst": recipe("-sync")},
            "default_recipe": "bench", "gateway": {"port": 0, "http_port": 0, "max_in_flight": 4096}}


async def _direct_call(session, url: str, suffix: str = "") -> float:
    """The bound: proposers in parallel, then the aggregator, straight to the emulator."""
    async def one(model: str) -> None:
        body = {"model": model + suffix, "messages": [{"role": "user", "content": "q"}], "max_tokens": TOKENS,
                "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{url}/chat/completions", json=body) as resp:
            while await resp.content.readany():  # what arrived, as the gateway reads: the bare-client floor
                pass

    t0 = time.perf_counter()
    await asyncio.gather(*(one(m) for m in PROPOSERS))
    await one(AGGREGATOR[0])
    return time.perf_counter() - t0


async def _closed_loop(call, concurrency: int, total: int, spread_s: float = 0.0) -> tuple[list[float], float]:
    """`concurrency` clients each calling again as soon as its call returns; client i starts after
    i / concurrency * spread_s."""
    latencies: list[float] = []
    left = total

    async def worker(i: int):
        nonlocal left
        await asyncio.sleep(i / concurrency * spread_s)
        while left > 0:
            left -= 1
            latencies.append(await call())

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return latencies, time.perf_counter() - t0


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


async def bench(url: str, port: int, http_port: int, floor_port: int, plan: list[tuple[int, int]],
                pids: dict[str, int]) -> dict:
    import aiohttp
    import grpc

    from moaa.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

    connector = aiohttp.TCPConnector(limit=0)
    results = {}
    async with aiohttp.ClientSession(connector=connector) as session, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http_session, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, \
            grpc.aio.insecure_channel(f"127.0.0.1:{floor_port}") as floor_channel:
        stub = gateway_pb2_grpc.MoAGatewayStub(channel)
        floor_stub = gateway_pb2_grpc.MoAGatewayStub(floor_channel)
        req = gateway_pb2.GenerateRequest(messages=[common_pb2.Message(role="user", content="q")])

        added: list[float] = []

        async def via_gateway(request, to=stub, into=added) -> float:
            t0 = time.perf_counter()
            resp = await to.Generate(request, timeout=120)
            lat = time.perf_counter() - t0
            assert resp.text and len(resp.layers[0].proposals) == 3, resp
            # this call's own critical path, as the gateway timed its backend requests
            critical = max(p.latency_s for p in resp.layers[0].proposals) + resp.latency.aggregator_s
            into.append(lat - critical)
            return lat

        http_added: list[float] = []
        chat_url = f"http://127.0.0.1:{http_port}/v1/chat/completions"

        async def via_http(recipe: str) -> float:
            body = {"model": recipe or "bench", "messages": [{"role": "user", "content": "q"}]}
            t0 = time.perf_counter()
            async with http_session.post(chat_url, json=body) as r:
                resp = await r.json()
            lat = time.perf_counter() - t0
            assert r.status == 200, resp
            moa = resp["moaa"]
            proposals = moa["layers"][0]["proposals"]
            assert resp["choices"][0]["message"]["content"] and len(proposals) == 3, resp
            http_added.append(lat - (max(p["latency_s"] for p in proposals) + moa["latency"]["aggregator_s"]))
            return lat

        def cpu() -> dict[str, float]:
            return {name: _cpu_s(pid) for name, pid in pids.items()}

        await _closed_loop(lambda: _direct_call(session, url), 32, 32)  # warm connections
        await _closed_loop(lambda: via_gateway(req), 32, 32)
        await _closed_loop(lambda: via_http(""), 32, 32)
        spread = max(PROPOSERS.values()) + AGGREGATOR[1]
        rows = [(str(conc), conc, total, spread, "", "") for conc, total in plan]
        burst = plan[1]
        rows.append((f"{burst[0]} burst", burst[0], burst[1], 0.0, SYNC, "burst"))
        floor: list[float] = []
        await _closed_loop(lambda: via_gateway(req, floor_stub, floor), 8, 8)
        for label, conc, total, spread_s, suffix, recipe in rows:
            # alternate direct and gateway slices so that load from elsewhere hits both alike
            d_lat, g_lat, h_lat, added[:], http_added[:] = [], [], [], [], []
            d_wall = g_wall = 0.0
            cpu_d = dict.fromkeys(pids, 0.0)
            cpu_g = dict.fromkeys(pids, 0.0)
            cpu_h = dict.fromkeys(pids, 0.0)
            greq = gateway_pb2.GenerateRequest(recipe=recipe, messages=req.messages)
            for _ in range(2):
                c0 = cpu()
                lat, wall = await _closed_loop(lambda: _direct_call(session, url, suffix), conc, total // 2, spread_s)
                c1 = cpu()
                d_lat += lat
                d_wall += wall
                lat, wall = await _closed_loop(lambda: via_gateway(greq), conc, total // 2, spread_s)
                c2 = cpu()
                g_lat += lat
                g_wall += wall
                lat, _ = await _closed_loop(lambda: via_http(recipe), conc, total // 2, spread_s)
                c3 = cpu()
                h_lat += lat
                for k in pids:
                    cpu_d[k] += (c1[k] - c0[k]) / total * 1e3
                    cpu_g[k] += (c2[k] - c1[k]) / total * 1e3
                    cpu_h[k] += (c3[k] - c2[k]) / total * 1e3
            floor[:] = []
            floor_cpu = None
            if label in ("1", "64"):  # the same calls against a server that only sleeps: gRPC's own cost
                c0 = _cpu_s(pids["floor"])
                await _closed_loop(lambda: via_gateway(req, floor_stub, floor), conc, total, spread_s)
                floor_cpu = (_cpu_s(pids["floor"]) - c0) / total * 1e3
            n = len(g_lat)
            results[label] = {"floor_p50_ms": _pct(floor, 50) * 1e3 if floor else None, "calls": n,
                              "floor_cpu_ms_per_call": floor_cpu, "direct_p50": _pct(d_lat, 50), "direct_p99": _pct(d_lat, 99),
                              "gw_p50": _pct(g_lat, 50), "gw_p99": _pct(g_lat, 99),
                              "added_p50_ms": _pct(added, 50) * 1e3, "added_p99_ms": _pct(added, 99) * 1e3,
                              # Little's law: calls in flight / mean latency (the staggered start's ramp
                              # would otherwise count as idle time)
                              "direct_tput": conc / (sum(d_lat) / len(d_lat)), "gw_tput": conc / (sum(g_lat) / n),
                              "direct_wall_tput": len(d_lat) / d_wall, "gw_wall_tput": n / g_wall,
                              "cpu_ms_per_call_direct": cpu_d, "cpu_ms_per_call_gateway": cpu_g,
                              "http_p50": _pct(h_lat, 50), "http_p99": _pct(h_lat, 99),
                              "http_added_p50_ms": _pct(http_added, 50) * 1e3,
                              "http_added_p99_ms": _pct(http_added, 99) * 1e3,
                              "http_tput": conc / (sum(h_lat) / len(h_lat)), "cpu_ms_per_call_http": cpu_h}
            r = results[label]
            print(f"  {label:>9} concurrent, {n} calls: bound (direct) p50 {r['direct_p50']*1e3:7.1f} ms, "
                  f"gateway p50 {r['gw_p50']*1e3:7.1f} ms, p99 {r['gw_p99']*1e3:7.1f} ms, "
                  f"throughput {r['gw_tput']:.1f}/s vs bound {r['direct_tput']:.1f}/s", flush=True)
            print(f"        HTTP door p50 {r['http_p50']*1e3:7.1f} ms, p99 {r['http_p99']*1e3:7.1f} ms, "
                  f"throughput {r['http_tput']:.1f}/s", flush=True)
            per_call = len(PROPOSERS) + 1
            r["cpu_ms_per_backend_request"] = cpu_g["gateway"] / per_call
            r["bare_client_cpu_ms_per_request"] = cpu_d["client"] / per_call
            print(f"        gateway CPU per backend request: {r['cpu_ms_per_backend_request']:.3f} ms "
                  f"(process CPU time / {per_call} requests per call); a bare aiohttp client sending the same "
                  f"requests (the direct run): {r['bare_client_cpu_ms_per_request']:.3f} ms, the floor for an "
                  f"aiohttp-based gateway at this request rate; items (calls)/s {r['gw_tput']:.1f}", flush=True)
            if floor_cpu is not None:
                print(f"        per call: gateway {cpu_g['gateway']:.2f} ms CPU = serving one gRPC call (the "
                      f"do-nothing server: {floor_cpu:.2f} ms) + {per_call} bare aiohttp requests "
                      f"({cpu_d['client']:.2f} ms) + the gateway's own work "
                      f"({cpu_g['gateway'] - floor_cpu - cpu_d['client']:.2f} ms)", flush=True)
            print("        CPU ms per call: direct run " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_d.items())
                  + "; gateway run " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_g.items())
                  + "; HTTP door run " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_h.items()), flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls")
    ap.add_argument("--smoke", action="store_true", help="fewest calls: proves the script works, figures are noise")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--batch-only", action="store_true", help="only the GenerateBatch rows")
    args = ap.parse_args()
    batch_items = 64 if args.smoke else BATCH_ITEMS
    if args.batch_only:
        rows = [asyncio.run(batch_row(slots, batch_items)) for slots in (64, 8)]
        write_json(args.json, {"batch": rows})
        return 0 if rows[0]["capacity_share"] >= 0.9 else 1
    plan = [(1, 4), (64, 128), (512, 1024)] if args.quick else [(1, 8), (64, 256), (512, 2048)]
    if args.smoke:
        plan = [(1, 2), (64, 64), (512, 512)]
    emu, url = spawn(run_emulator, {"record": False, "default_max_tokens": TOKENS}, _profiles())
    fl, floor_port = spawn(_run_floor)
    gw, (port, http_port) = spawn(run_server, "gateway", _gateway_config(url), ("port", "http_port"))
    # the slowest proposer stays slowest (its lead is at least the jitter): mean = both means added
    critical = max(PROPOSERS.values()) + AGGREGATOR[1] + JITTER_S
    print(f"emulator {url}, gateway 127.0.0.1:{port}; mean critical path as configured: {critical:.2f} s; "
          f"{os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.1f}", flush=True)
    try:
        res = asyncio.run(bench(url, port, http_port, floor_port, plan,
                                {"emulator": emu.pid, "gateway": gw.pid, "client": os.getpid(), "floor": fl.pid}))
    finally:
        gw.terminate()
        fl.terminate()
        emu.terminate()
    print(f"load average after the run {os.getloadavg()[0]:.1f} (other work on the machine slows every figure)")
    print("\nadded latency per call = latency seen by the client - (slowest proposer + aggregator, as the gateway "
          "timed its backend requests); ratio = gateway p50 / direct-bound p50")
    for conc, r in res.items():
        print(f"  {conc:>9} concurrent: added p50 {r['added_p50_ms']:6.2f} ms, p99 {r['added_p99_ms']:7.2f} ms; "
              f"vs the direct bound: p50 {(r['gw_p50'] - r['direct_p50']) * 1e3:+8.1f} ms "
              f"(ratio {r['gw_p50'] / r['direct_p50']:.3f}), p99 {(r['gw_p99'] - r['direct_p99']) * 1e3:+8.1f} ms "
              f"(ratio {r['gw_p99'] / r['direct_p99']:.3f})")
        print(f"  {'':>9}   HTTP door: added p50 {r['http_added_p50_ms']:6.2f} ms, p99 {r['http_added_p99_ms']:7.2f} ms "
              f"({r['http_added_p50_ms'] - r['added_p50_ms']:+.2f} ms p50 vs gRPC); throughput "
              f"{r['http_tput'] / r['gw_tput']:.3f} of gRPC's, {r['http_tput'] / r['direct_tput']:.3f} of the bound")
        if r["floor_p50_ms"] is not None:
            print(f"  {'':>9}   a gRPC server that only sleeps, same calls: added p50 {r['floor_p50_ms']:6.2f} ms "
                  f"(one round trip's floor here); the gateway's own share {r['added_p50_ms'] - r['floor_p50_ms']:+.2f} ms")
    r512 = res["512"]
    ideal = 512 / critical
    print(f"throughput at 512: {r512['gw_tput']:.1f} calls/s = {r512['gw_tput'] / r512['direct_tput']:.3f} of the "
          f"emulator bound ({r512['direct_tput']:.1f}/s), {r512['gw_tput'] / ideal:.3f} of the configured-latency "
          f"bound ({ideal:.1f}/s)")
    t1 = res["64"]["added_p50_ms"] < 2.0
    t2 = r512["gw_tput"] / r512["direct_tput"] >= 0.9
    print(f"targets: p50 added < 2 ms at 64: {'met' if t1 else 'MISSED'}; "
          f"throughput >= 90% of bound at 512: {'met' if t2 else 'MISSED'}")
    t3 = res["64"]["http_added_p50_ms"] - res["64"]["added_p50_ms"] <= 1.0
    print(f"HTTP door: p50 added at 64 within 1 ms of gRPC's: {'met' if t3 else 'MISSED'}; throughput at 512 "
          f"{r512['http_tput'] / r512['gw_tput']:.3f} of gRPC's")
    r64 = res["64"]
    t5 = r64["cpu_ms_per_backend_request"] <= 0.5
    print(f"gateway CPU per backend request at 64 concurrent <= 0.5 ms: {'met' if t5 else 'MISSED'} "
          f"({r64['cpu_ms_per_backend_request']:.3f} ms; a bare aiohttp client sending the same requests costs "
          f"{r64['bare_client_cpu_ms_per_request']:.3f} ms); added p99 at 512 <= 10 ms: "
          f"{'met' if r512['added_p99_ms'] <= 10 else 'MISSED'} ({r512['added_p99_ms']:.1f} ms)")
    batch = [asyncio.run(batch_row(slots, batch_items)) for slots in (64, 8)]
    t4 = batch[0]["capacity_share"] >= 0.9
    print(f"GenerateBatch with default settings >= 90% of capacity at 64 slots: {'met' if t4 else 'MISSED'}")
    ok = t1 and t2 and t3 and t4
    res["batch"] = batch
    write_json(args.json, res)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
