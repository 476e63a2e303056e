"""Soak: do the gateway and the annotator stay bounded under a steady mixed load with faults?

    python benchmarks/soak.py [--calls 4000] [--rate 30] [--warmup 1000] [--every 500]

One process, one event loop: two emulators (MoA models; judges), a real annotator and a real gateway (gRPC
and its OpenAI-compatible HTTP door, bearer tokens on), and this load generator, at `--rate` calls per
second (paced, not as fast as possible: keep it to a fraction of one core). The mix, by call number:
Generate; GenerateStream (every 3rd cancelled after its first event); GenerateBatch of 3 items (every 4th
abandoned after one result); Generate with annotate=true; Annotate; AnnotateStream of 2 items; HTTP chat
completions, plain and streamed (every 3rd streamed one hung up on mid-stream); a bad token; a bad request;
Sample (n=2); every call with its own request id. Every 500 calls one proposer goes down (all its requests
500, so its circuit opens) for 100 calls, then comes back; the emulator also injects 5 % 500s throughout, and for 5
calls in every 50 the other proposer cuts its streams, answers slowly or stalls past the chunk-gap timeout;
a request on a connection the emulator's keep-alive timer just closed is dropped (keepalive_race); health
probes run every second.

tracemalloc traces the whole run; after `--warmup` calls a baseline is taken. Printed at the end: calls done,
RSS at the baseline and at the end, the traced bytes per 1,000 calls that grew in moaa's own files
(moaa/ and services/, what our code allocated and still holds) with the top sites by file:line, asyncio task
count, open fds, and gc object counts by type that grew.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKEN_ENV = "MOAA_SOAK_TOKENS"
GOOD = (("authorization", "Bearer soak-token"),)
BAD = (("authorization", "Bearer wrong"),)
OURS = (str(ROOT / "moaa"), str(ROOT / "services"))
# proposer 'a' takes one of these for 5 calls in every 50: a cut stream, a slow first token, a stall past
# the chunk-gap timeout (0.3 s here)
FAULTS = ({"disconnect_after_chunks": 2}, {"ttft_s": 0.3}, {"stall_after_chunks": 1, "stall_s": 1.0})


def ours(frame_file: str) -> bool:
    return frame_file.startswith(OURS) and "/v1/" not in frame_file  # generated stubs are protobuf's


def traced_ours(snapshot) -> tuple[int, list]:
    stats = [s for s in snapshot.statistics("lineno") if ours(s.traceback[0].filename)]
    return sum(s.size for s in stats), stats


def fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2 ** 20


class Load:
    """The mixed calls, one per `call(i)`."""

    def __init__(self, gw_stub, ann_stub, http_url: str, session, emu):
        from moaa.v1 import annotator_pb2, common_pb2, gateway_pb2
        self.gw, self.ann, self.http, self.session, self.emu = gw_stub, ann_stub, http_url, session, emu
        self.pb, self.apb, self.cpb = gateway_pb2, annotator_pb2, common_pb2
        self.outcomes: Counter[str] = Counter()

    def _gen(self, i: int, **kw):
        msg = self.cpb.Message(role="user", content=f"question {i} about mixtures of agents")
        return self.pb.GenerateRequest(messages=[msg], request_id=f"soak-{i}", **kw)

    def _ann(self, i: int, **kw):
        return self.apb.AnnotateRequest(
            prompt=[self.cpb.Message(role="user", content="What is the capital of France?")],
            candidates=[self.apb.Candidate(id="a", text="Paris is the capital."),
                        self.apb.Candidate(id="b", text="It is Lyon.")], request_id=f"soak-{i}", **kw)

    async def call(self, i: int) -> None:
        import grpc
        kind = i % 11
        try:
            await asyncio.wait_for(self._call(kind, i), 30)
            self.outcomes[f"{kind}:ok"] += 1
        except grpc.aio.AioRpcError as err:
            self.outcomes[f"{kind}:{err.code().name}"] += 1
        except Exception as err:  # noqa: BLE001 - counted, the soak goes on
            self.outcomes[f"{kind}:{type(err).__name__}"] += 1

    async def _call(self, kind: int, i: int) -> None:
        if kind == 0:
            await self.gw.Generate(self._gen(i), metadata=GOOD, timeout=20)
        elif kind == 1:
            call = self.gw.GenerateStream(self._gen(i), metadata=GOOD, timeout=20)
            async for _ in call:
                if i % 3 == 0:
                    call.cancel()
                    break
        elif kind == 2:
            items = [self.pb.BatchItem(id=f"{i}-{k}", request=self._gen(i * 10 + k)) for k in range(3)]
            call = self.gw.GenerateBatch(iter(items), metadata=GOOD, timeout=20)
            async for _ in call:
                if i % 4 == 0:  # abandoned: the client hangs up after one result
                    call.cancel()
                    break
        elif kind == 3:
            await self.gw.Generate(self._gen(i, annotate=True), metadata=GOOD, timeout=20)
        elif kind == 4:
            await self.ann.Annotate(self._ann(i), timeout=20)
        elif kind == 5:
            reqs = [self.apb.AnnotateRequest(id=f"{i}-{k}", **{f: getattr(self._ann(i), f) for f in
                                                               ("prompt", "candidates", "request_id")})
                    for k in range(2)]
            async for _ in self.ann.AnnotateStream(iter(reqs), timeout=20):
                pass
        elif kind in (6, 7):
            await self._http(i, stream=kind == 7, hang_up=kind == 7 and i % 3 == 0)
        elif kind == 8:
            await self.gw.Generate(self._gen(i), metadata=BAD, timeout=20)
        elif kind == 9:
            await self.gw.Generate(self.pb.GenerateRequest(request_id=f"soak-{i}"), metadata=GOOD, timeout=20)
        else:
            await self.gw.Sample(self.pb.SampleRequest(model="a", messages=self._gen(i).messages, n=2,
                                                       request_id=f"soak-{i}"), metadata=GOOD, timeout=20)

    async def _http(self, i: int, stream: bool, hang_up: bool) -> None:
        body = {"model": "moa", "stream": stream, "messages": [{"role": "user", "content": f"question {i}"}]}
        headers = {"Authorization": "Bearer soak-token", "X-Request-Id": f"soak-{i}"}
        async with self.session.post(self.http + "/v1/chat/completions", json=body, headers=headers) as resp:
            if hang_up:
                await resp.content.readline()
                resp.close()  # the client hangs up mid-stream
                return
            await resp.read()

    def outage(self, i: int) -> None:
        """Every 500 calls proposer 'b' fails every request for 100 calls (its circuit opens), then heals."""
        if i % 500 == 0:
            self.emu.profiles["b"] = {"error_rates": {500: 1.0}}
        elif i % 500 == 100:
            self.emu.profiles["b"] = {}


def config(emu_url: str, judge_url: str, ann_address: str | None) -> dict:
    backend = {"urls": [emu_url], "retries": {"max_attempts": 2, "backoff_base_s": 0.01},
               "timeouts": {"chunk_gap_s": 0.3},
               "health": {"probe_interval_s": 1.0}, "circuit": {"failure_threshold": 3, "reset_after_s": 0.5}}
    judge = {"urls": [judge_url], "served_model": "keyword:paris", "health": {"probe_interval_s": 1.0}}
    cfg = {"backends": {"a": backend, "b": backend, "agg": backend, "judge1": judge, "judge2": judge},
           "recipes": {"moa": {"proposers": [{"model": "a"}, {"model": "b"}], "aggregator": {"model": "agg"},
                               "min_proposers": 1}},
           "ensembles": {"e": {"judges": [{"name": "j1", "model": "judge1"}, {"name": "j2", "model": "judge2"}],
                               "mode": "pointwise"}},
           "gateway": {"port": 0, "http_port": 0, "auth": {"tokens_env": TOKEN_ENV}},
           "annotator": {"port": 0}}
    if ann_address:
        cfg["annotator_address"] = ann_address
    return cfg


async def soak(calls: int, rate: float, warmup: int, every: int = 1000, top: int = 12) -> dict:
    import aiohttp
    import grpc

    from moaa.services.annotator.server import start_annotator
    from moaa.services.config import parse_config
    from moaa.services.emulator import Emulator, EmulatorSettings
    from moaa.services.gateway.server import start_gateway
    from moaa.v1 import annotator_pb2_grpc, gateway_pb2_grpc

    os.environ[TOKEN_ENV] = "soak-token"
    faults = {"error_rates": {500: 0.05}, "ttft_jitter_s": 0.02}
    # keep-alive races: the emulator closes idle connections after 0.5 s, the backend client keeps them 4 s
    emu = Emulator(EmulatorSettings(record=False, keepalive_race=True, keepalive_timeout_s=0.5, **faults),
                   {"agg": {"tokens_per_s": 2000}})
    judges = Emulator(EmulatorSettings(judge=True, record=False))
    await emu.start()
    await judges.start()
    ann = await start_annotator(parse_config(config(emu.url, judges.url, None)), port=0, probes=True)
    gw = await start_gateway(parse_config(config(emu.url, judges.url, ann.address)), probes=True)
    gw_ch, ann_ch = grpc.aio.insecure_channel(gw.address), grpc.aio.insecure_channel(ann.address)
    session = aiohttp.ClientSession()
    http_url = f"http://127.0.0.1:{gw.http_port}"
    load = Load(gateway_pb2_grpc.MoAGatewayStub(gw_ch), annotator_pb2_grpc.AnnotatorStub(ann_ch), http_url,
                session, emu)
    pending: set[asyncio.Task] = set()
    rows: list[tuple] = []   # (calls, RSS MB, tasks, fds, gc objects, traced bytes) every `every` calls
    base = None
    i = 0
    try:
        while i < calls:
            i += 1
            load.outage(i)
            if i % 50 == 0:  # now and then cut, slow or stalled answers (timeouts), as real backends give
                emu.profiles["a"] = FAULTS[i // 50 % len(FAULTS)]
            elif i % 50 == 5:
                emu.profiles["a"] = {}
            task = asyncio.create_task(load.call(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if i % every == 0:
                rows.append((i, rss_mb(), len(asyncio.all_tasks()), fds(), len(gc.get_objects()),
                             tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0))
            if i == warmup:
                await asyncio.gather(*pending)
                await asyncio.sleep(0.5)
                gc.collect()
                base = dict(calls=i, snap=tracemalloc.take_snapshot(), rss=rss_mb(), tasks=len(asyncio.all_tasks()),
                            fds=fds(), types=Counter(type(o).__name__ for o in gc.get_objects()))
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*pending)
        await asyncio.sleep(1.0)  # let closed streams and connections settle
        gc.collect()
        end = dict(calls=i, snap=tracemalloc.take_snapshot(), rss=rss_mb(), tasks=len(asyncio.all_tasks()),
                   fds=fds(), types=Counter(type(o).__name__ for o in gc.get_objects()))
    finally:
        await session.close()
        await gw_ch.close()
        await ann_ch.close()
        await gw.stop(0)
        await ann.stop(0)
        await emu.stop()
        await judges.stop()
    grown = end["snap"].compare_to(base["snap"], "lineno")
    mine = [d for d in grown if ours(d.traceback[0].filename) and d.size_diff > 0]
    calls = end["calls"] - base["calls"]
    return {"calls": i, "measured": calls, "base": base, "end": end, "outcomes": load.outcomes,
            "faults": {**emu.stats.faults, **{f"http_{k}": v for k, v in emu.stats.errors.items()}},
            "growth_per_1000": sum(d.size_diff for d in mine) * 1000 / max(1, calls),
            "net_per_1000": (traced_ours(end["snap"])[0] - traced_ours(base["snap"])[0]) * 1000 / max(1, calls),
            "top": mine[:top], "types": (end["types"] - base["types"]).most_common(top), "rows": rows}


def report(r: dict) -> None:
    b, e = r["base"], r["end"]
    print(f"calls done: {r['calls']} (measured {r['measured']} after a warm-up of {b['calls']})")
    print(f"outcomes (kind:code): {dict(sorted(r['outcomes'].items()))}")
    print(f"faults the emulator injected: {r['faults']}")
    print(f"RSS: {b['rss']:.1f} MB at call {b['calls']} -> {e['rss']:.1f} MB at call {e['calls']}")
    print(f"traced bytes held by moaa's own files: {r['net_per_1000']:+.0f} B per 1,000 calls "
          f"(sites that grew: {r['growth_per_1000']:+.0f} B per 1,000 calls)")
    print(f"asyncio tasks: {b['tasks']} -> {e['tasks']}; open fds: {b['fds']} -> {e['fds']}")
    print("top growing sites in moaa's files:")
    for d in r["top"]:
        frame = d.traceback[0]
        print(f"  {d.size_diff:+8d} B {d.count_diff:+6d} blocks  {os.path.relpath(frame.filename, ROOT)}:{frame.lineno}")
    print(f"gc object types that grew: {r['types']}")
    print("calls   RSS MB  tasks  fds  gc objects  traced MB (all of Python)")
    for calls, rss, tasks, nfds, objs, traced in r["rows"]:
        print(f"{calls:6d} {rss:8.1f} {tasks:6d} {nfds:4d} {objs:11d} {traced / 2 ** 20:9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=4000, help="calls in all")
    ap.add_argument("--rate", type=float, default=30.0, help="calls started per second (30: about half a core)")
    ap.add_argument("--warmup", type=int, default=1000, help="calls before the baseline snapshot")
    ap.add_argument("--every", type=int, default=500, help="a row of RSS, tasks, fds and gc objects every N calls")
    args = ap.parse_args()
    import logging
    logging.disable(logging.CRITICAL)  # the injected faults' log lines are expected: keep the output readable
    tracemalloc.start(1)
    if args.warmup >= args.calls:
        ap.error(f"--warmup {args.warmup} must be below --calls {args.calls}")
    report(asyncio.run(soak(args.calls, args.rate, args.warmup, args.every)))


if __name__ == "__main__":
    main()
