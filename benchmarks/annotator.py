"""Annotator throughput against emulated judges, and how busy the judge backends were.

    python benchmarks/annotator.py [--quick]

Three processes: the emulator in judge mode (every judge backend; each request takes DELAY_S), the annotator
server, and this client, which streams prompts with 5 candidates each through AnnotateStream. Each
judge backend allows CONCURRENCY requests in flight (the BackendPool's max_concurrency), so the bound
for one-call-per-judge modes is CONCURRENCY / DELAY_S annotations per second (every judge backend busy
with all its slots all the time). Printed per mode: annotations/s, the ratio to that bound, and per judge
backend the share of wall time it had at least one request in flight ("busy") and the share of its
slots in use ("slots"). In mode 'moa' the aggregator judge runs after the judges, on its own backend.
Mode moa runs twice: at DELAY_S, where about 640 judge requests/s bring the annotator's own CPU close to
the limit on a small machine, and at SLOW_DELAY_S (an LLM judge's latency, the same slots), where they do
not: there the share of the bound says only whether prompts pipeline.
Targets: judge backends busy >= 95 % of the time; pointwise >= 75 % of the bound; moa >= 80 %. Also
printed: the annotator's CPU time per judge request (process CPU time, which other load barely changes).
Figures are in the README.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

from _procs import cpu_s, run_emulator, run_server, spawn, write_json  # benchmarks/ is on sys.path when run as a script
import time

DELAY_S = 0.05
CONCURRENCY = 8
JUDGES = {"j1": "keyword:paris", "j2": "longest+text", "j3": "keyword:capital"}


SLOW_DELAY_S = 0.5  # an LLM judge's latency: the annotator's CPU is then far from the limit


def _policy(name: str, delay: float = DELAY_S) -> str:
    # the name makes each backend's served model, and so its busy-time counters, distinct
    return f"{JUDGES.get(name, 'keyword:paris')}+delay={delay}+name={name}"


def _config(url: str) -> dict:
    """Judges j1..j3 and aggregator agg at DELAY_S; the same at SLOW_DELAY_S as j1-slow.. (ensemble moa-slow)."""
    backends = {}
    for suffix, delay in (("", DELAY_S), ("-slow", SLOW_DELAY_S)):
        backends.update({name + suffix: {"urls": [url], "served_model": _policy(name, delay) + suffix,
                                         "max_concurrency": CONCURRENCY, "health": {"probe_interval_s": 3600}}
                         for name in [*JUDGES, "agg"]})

    def judges(suffix: str = "") -> list[dict]:
        return [{"name": n, "model": n + suffix} for n in JUDGES]
    return {"backends": backends, "annotator": {"port": 0},
            "ensembles": {"pointwise": {"judges": judges(), "mode": "pointwise", "combine": "mean"},
                          "moa": {"judges": judges(), "mode": "moa", "aggregator": {"name": "agg", "model": "agg"}},
                          "moa-slow": {"judges": judges("-slow"), "mode": "moa",
                                       "aggregator": {"name": "agg", "model": "agg-slow"}}}}


async def _stats(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(url.replace("/v1", "/emulator/stats")) as r:
            return (await r.json())["models"]


async def _run_mode(address: str, emu_url: str, ensemble: str, prompts: int, pid: int) -> dict:
    slow = ensemble.endswith("-slow")
    delay, suffix = (SLOW_DELAY_S, "-slow") if slow else (DELAY_S, "")
    import grpc

    from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2

    def req(i: int) -> annotator_pb2.AnnotateRequest:
        cands = ["Paris is the capital of France.", "It is Paris.", "Lyon.", "Bananas are yellow.", "Capital: Paris"]
        return annotator_pb2.AnnotateRequest(
            id=f"{ensemble}-{i}", ensemble=ensemble,
            prompt=[common_pb2.Message(role="user", content=f"What is the capital of France? ({i})")],
            candidates=[annotator_pb2.Candidate(id=str(k), text=t) for k, t in enumerate(cands)])

    async def gen():
        for i in range(prompts):
            yield req(i)

    before = await _stats(emu_url)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = annotator_pb2_grpc.AnnotatorStub(ch)
        t0, c0 = time.perf_counter(), cpu_s(pid)
        n = errors = 0
        async for res in stub.AnnotateStream(gen()):
            n += 1
            errors += res.WhichOneof("result") == "error"
        wall, cpu = time.perf_counter() - t0, cpu_s(pid) - c0
    after = await _stats(emu_url)
    busy = {}
    for name in [*JUDGES, "agg"]:
        model = _policy(name, delay) + suffix
        a, b = after.get(model, {}), before.get(model, {})
        if not a or a.get("requests", 0) == b.get("requests", 0):
            continue
        busy[name] = {"busy": (a["busy_s"] - b.get("busy_s", 0)) / wall,
                      "slots": (a["slot_s"] - b.get("slot_s", 0)) / (CONCURRENCY * wall),
                      "requests": a["requests"] - b.get("requests", 0)}
    rate = n / wall
    bound = CONCURRENCY / delay
    return {"mode": ensemble, "delay_s": delay, "annotations": n, "errors": errors, "wall_s": round(wall, 2),
            "per_s": round(rate, 1), "bound_per_s": bound, "ratio": round(rate / bound, 3), "backends": busy,
            # the annotator process's CPU time per judge request it made
            "cpu_ms_per_backend_request": cpu * 1e3 / max(1, sum(b["requests"] for b in busy.values()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer prompts")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    prompts = 200 if args.quick else 1000
    emu, emu_url = spawn(run_emulator, {"judge": True, "record": False}, None)
    ann, address = spawn(run_server, "annotator", _config(emu_url), ("address",))
    results = []
    try:
        for mode in ("pointwise", "moa", "moa-slow"):
            r = asyncio.run(_run_mode(address, emu_url, mode, prompts, ann.pid))
            results.append(r)
            print(f"{mode:<9} ({r['delay_s']:g} s per judge request) {r['annotations']} annotations in {r['wall_s']} s: {r['per_s']}/s, "
                  f"{r['ratio']:.0%} of the bound {r['bound_per_s']:.0f}/s ({r['errors']} errors); annotator CPU "
                  f"{r['cpu_ms_per_backend_request']:.3f} ms per judge request")
            for name, b in r["backends"].items():
                print(f"    {name:<4} busy {b['busy']:.1%}  slots {b['slots']:.1%}  requests {b['requests']}")
    finally:
        ann.terminate()
        emu.terminate()
    write_json(args.json, results)
    slow = results[-1]
    fast = results[1]
    print(f"target: mode moa >= 80 % of its judges' capacity: {'met' if slow['ratio'] >= 0.8 else 'MISSED'} at "
          f"{SLOW_DELAY_S:g} s per judge request ({slow['ratio']:.0%}), {'met' if fast['ratio'] >= 0.8 else 'MISSED'} "
          f"at {DELAY_S:g} s ({fast['ratio']:.0%}; there the annotator's own CPU is the tighter limit)")
    return 0 if min(slow["ratio"], fast["ratio"]) >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
