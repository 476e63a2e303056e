"""`moaa annotate`: a samples file -> preference rows in the one schema (`pairs.py`), through a running
annotator's AnnotateStream; and `annotate_once`, one Annotate call (`moaa eval`'s ensemble judge).

Resumable by row id through the one resumable writer (`moaa.jsonl`). Pairs the judges could not separate
and rows with fewer than two distinct answers go to `<out>.skipped.jsonl`; rows the annotator refused as
bad input (INVALID_ARGUMENT: e.g. a judging prompt past a judge's context) to `<out>.rejected.jsonl`;
both are done, never resent. Transient failures go to `<out>.errors.jsonl` and are retried by the next run.
`<out>.report.json` holds the per-judge position bias, agreement and length
correlation over every row of `--out` (a resumed run's included), and the counts of this run.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import shutil
import sys
import tempfile
from pathlib import Path

import grpc

from moaa.errors import TransientError, UserError
from moaa.idset import IdSet
from moaa.files import RESEND_HINT, atomic_write_json, atomic_write_text, rejected_note, rejection
from moaa.jsonl import STDIN, JsonlAppender, encode, iter_input, iter_scan
from moaa.lock import output_lock
from moaa.progress import StageProgress
from moaa.v1 import annotator_pb2, annotator_pb2_grpc

from .endpoint import Endpoint
from .errors import call_error
from .pairs import PAIR_KEYS, SKIP_KEYS, annotate_request, failed_judge_models, not_a_pair, pair_row, skip_info
from .window import windowed


class RunReport:
    """Per-judge bias and agreement over a run (means over the prompts where each was defined), kept as
    running sums: its size is the judges', not the rows'."""

    KEYS = ("position_bias", "length_correlation", "agreement", "order_flip_rate")

    def __init__(self):
        self.judges: dict[str, dict[str, list[float]]] = {}   # judge -> key -> [sum, count]; abstentions: a sum
        self.counts = {"pairs": 0, "skipped": 0, "rejected": 0, "errors": 0, "already_done": 0,
                       "fewer_judges": 0}   # rows decided without a judge whose backend failed (min_judges)
        self.judge_failures: dict[str, int] = {}   # judge model -> rows decided without it
        self.skip_reasons: dict[str, int] = {}
        self.rejected_reason = ""   # the first rejection's message

    def skip(self, reason: str) -> None:
        self.counts["skipped"] += 1
        key = reason.split(":")[0]
        self.skip_reasons[key] = self.skip_reasons.get(key, 0) + 1

    def add(self, resp) -> None:
        """A row judged by this run."""
        failed = failed_judge_models(resp)
        self.counts["fewer_judges"] += bool(failed)
        for model in failed:
            self.judge_failures[model] = self.judge_failures.get(model, 0) + 1
        for j in resp.judges:
            self._judge(j.judge, {k: getattr(j, k) for k in self.KEYS}, j.abstentions)

    def add_written(self, row: dict) -> None:
        """A row a run before wrote (its annotation block): the judges' means cover every row of --out."""
        for j in (row.get("annotation") or {}).get("judges", []):
            self._judge(j["judge"], {k: j.get(k) for k in self.KEYS}, j.get("abstentions") or 0)

    def _judge(self, name: str, values: dict, abstentions: int) -> None:
        d = self.judges.setdefault(name, {**{k: [0.0, 0] for k in self.KEYS}, "abstentions": 0, "rows": 0})
        d["rows"] += 1
        for key, v in values.items():
            if v is not None and not math.isnan(v):
                d[key][0] += v
                d[key][1] += 1
        d["abstentions"] += abstentions

    def summary(self) -> dict:
        judges = {}
        for name, d in self.judges.items():
            judges[name] = {k: (round(d[k][0] / d[k][1], 4) if d[k][1] else None) for k in self.KEYS}
            judges[name].update(abstentions=d["abstentions"], rows=d["rows"])
        return {**self.counts, "skip_reasons": self.skip_reasons, "rejected_reason": self.rejected_reason,
                "judges": judges, "judge_failures": self.judge_failures}

    def reject(self, reason: str) -> None:
        self.counts["rejected"] += 1
        self.rejected_reason = self.rejected_reason or reason


async def annotate_file(ep: Endpoint, in_path: str, out_path: str, *, ensemble: str = "", mode: str = "",
                        progress: bool = True, window: int = 32) -> dict:
    """Memory stays the window's rows and the ids (16 bytes each), however many rows: the input is read
    twice, a checking pass and a sending pass (standard input is spooled to a temporary file for that)."""
    with _spooled(in_path) as stream, output_lock(Path(out_path), "moaa annotate"):   # one writer per --out
        return await _annotate(ep, in_path, stream, out_path, ensemble=ensemble, mode=mode, progress=progress,
                               window=window)


@contextlib.contextmanager
def _spooled(in_path: str):
    """None for a file (read by name), or standard input copied to a temporary file (a pipe reads once)."""
    if in_path != STDIN:
        yield None
        return
    with tempfile.TemporaryFile() as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        yield spool


async def _annotate(ep: Endpoint, in_path: str, stream, out_path: str, *, ensemble: str, mode: str,
                    progress: bool, window: int) -> dict:
    src, out = Path(in_path), Path(out_path)
    writer = JsonlAppender(out)
    skipper = JsonlAppender(out.with_name(out.name + ".skipped.jsonl"))
    rejecter = JsonlAppender(out.with_name(out.name + ".rejected.jsonl"))
    errors_path = out.with_name(out.name + ".errors.jsonl")
    report = RunReport()
    if in_path != STDIN and src.resolve() == out.resolve():
        raise UserError(f"--out {out} is the input file: give the preference rows a file of their own")
    done = IdSet(itertools.chain(_done_ids(writer, PAIR_KEYS, report), _done_ids(skipper, SKIP_KEYS, report)))
    # rows rejected under this run's --ensemble/--mode are not resent; every run reports them (the user must
    # fix those rows). Rows rejected under others (`unknown ensemble 'typo'`, then the flag fixed) are resent
    settings = {"ensemble": ensemble, "mode": mode}
    rejected, superseded = IdSet(), 0
    for r in rejecter.open_iter():
        if _rejected_under(r, settings):
            rejected.add(r["id"])
            report.reject(r.get("reason", ""))
        else:
            superseded += 1
    if superseded:
        atomic_write_text(rejecter.path, (encode(r).decode() for r in rejecter.open_iter()
                                          if _rejected_under(r, settings)))
    rejected_before = report.counts["rejected"]
    list(iter_scan(errors_path))  # refuse a foreign file before deleting it
    errors_path.unlink(missing_ok=True)  # failures of the last run are retried now

    def rows():
        if stream is not None:
            stream.seek(0)
        for n, row in iter_input(src, "samples", stream=stream):
            req, reason = annotate_request(row, ensemble=ensemble, mode=mode, where=f"{src}:{n}")
            yield n, str(row["id"]), req, reason

    # the checking pass: duplicates refused and unsendable rows skipped before any call; only ids are kept.
    # A duplicate is refused whatever became of its first row (done, skipped, rejected): a resume checks as a
    # first run does
    todo, seen = IdSet(), IdSet()
    for n, rid, req, reason in rows():
        if rid in seen:
            raise UserError(f"{src}:{n}: row id {rid!r} appears twice")
        seen.add(rid)
        if rid in rejected:
            continue
        if rid in done:
            report.counts["already_done"] += 1
            continue
        if req is None:
            skipper.append({"id": rid, "reason": reason})
            report.skip(reason)
            done.add(rid)
            continue
        todo.add(rid)
    if not seen:   # as the pipeline refuses an empty prompt file: most likely the wrong file
        raise UserError(f"{src}: no rows to annotate (the file is empty)")
    failer = JsonlAppender(errors_path)
    left = len(todo)
    inflight: dict[str, annotator_pb2.AnnotateRequest] = {}   # fed and not answered: at most the window

    def requests():   # the sending pass
        for _, rid, req, _ in rows():
            if req is not None and rid in todo:
                inflight[rid] = req
                yield req

    # the bar counts the rows sent now and the rows a run before finished (this run's skips are in the counts line)
    already = report.counts["already_done"]
    bar = StageProgress("annotate", already + left, already, quiet=not progress)

    def reject(rid: str, reason: str) -> None:
        nonlocal left
        if inflight.pop(rid, None) is not None:
            left -= 1
            rejecter.append(rejection(rid, "annotate", reason, **settings))
            report.reject(reason)
            bar.advance(skipped=True)

    sent = bool(left)
    try:
        if sent:   # nothing left (a re-run after a complete run): no call, not even a connection
            async with ep.channel() as channel:
                stub = annotator_pb2_grpc.AnnotatorStub(channel)
                async for res in windowed(stub.AnnotateStream, requests(), ep=ep, what="annotator",
                                          window=window, hint=lambda: f"{left} rows left; rerun to resume",
                                          reject=reject):
                    req = inflight.pop(res.id, None)
                    if req is None:
                        continue
                    left -= 1
                    failed = res.WhichOneof("result") == "error"
                    if failed:
                        report.counts["errors"] += 1
                        failer.append({"id": res.id, "error": f"{res.error.code}: {res.error.message}"})
                    elif res.response.skipped:
                        report.skip(res.response.skip_reason)
                        report.add(res.response)
                        skipper.append({"id": res.id, "reason": res.response.skip_reason,
                                        **skip_info(req, res.response)})
                    else:
                        report.counts["pairs"] += 1
                        report.add(res.response)
                        writer.append(pair_row(req, res.response))
                    bar.advance(failed=failed)
    finally:
        bar.close()
        summary = report.summary()
        report_path = out.with_name(out.name + ".report.json")
        if sent or not report_path.exists():   # a run with nothing left keeps the judges' report of the last
            atomic_write_json(report_path, summary)
    if report.counts["errors"]:
        raise TransientError(f"{counts_line(summary, out)}; {report.counts['errors']} rows failed (see {errors_path}); "
                             "rerun to retry them")
    c = report.counts
    # every row rejected, or every row this run sent (a resume's: its flags may be what is wrong)
    all_sent = c["rejected"] > rejected_before and not (c["pairs"] or c["skipped"])
    if all_sent or (c["rejected"] and not (c["pairs"] or c["skipped"] or c["already_done"])):
        raise UserError(f"every row {'sent ' if c['already_done'] else ''}was rejected: {counts_line(summary, out)} "
                        f"({RESEND_HINT}; rows rejected under another --ensemble or --mode are resent by a run "
                        "with the new one)")
    return summary


def _rejected_under(record: dict, settings: dict[str, str]) -> bool:
    """Whether a rejection was made under these settings (a record without them, of an older moaa, was)."""
    return all(record.get(k, v) == v for k, v in settings.items())


def _done_ids(appender: JsonlAppender, keys: tuple[str, ...], report: RunReport):
    """Ids of the rows a run before wrote (their judges' statistics go to `report`); a row of another kind (a
    samples file given as --out) is an error, not a row 'already done'."""
    for row in appender.open_iter():
        problem = not_a_pair(row, keys)
        if problem:
            raise UserError(f"{appender.path}: row {row['id']!r} is {problem}: --out must be a file moaa annotate "
                            "wrote, or a new one")
        report.add_written(row)
        yield row["id"]


def counts_line(summary: dict, out: Path) -> str:
    """What a run did, in one line: printed when it ends, and inside its error when rows failed."""
    fewer = summary.get("fewer_judges", 0)
    return (f"{summary['pairs']} pairs written, {summary['skipped']} skipped, {summary['already_done']} already done"
            + (f" ({fewer} decided without a judge whose backend failed: "
               f"{', '.join(sorted(summary['judge_failures']))}; see annotation.failures)" if fewer else "")
            + rejected_note({**summary, "rejected_file": out.with_name(out.name + ".rejected.jsonl")}))


async def annotate_once(stub, ep: Endpoint, prompt: list[dict], cands: list[tuple[str, str]], *,
                        ensemble: str = "", mode: str = "", seed: int | None = None) -> annotator_pb2.AnnotateResponse:
    """One Annotate call: candidates (id, text) answering `prompt`."""
    req = annotator_pb2.AnnotateRequest(prompt=[{"role": m["role"], "content": m["content"]} for m in prompt],
                                        ensemble=ensemble, mode=mode,
                                        candidates=[annotator_pb2.Candidate(id=cid, text=t) for cid, t in cands])
    if seed is not None:
        req.seed = seed
    try:
        return await stub.Annotate(req, metadata=ep.metadata)
    except grpc.aio.AioRpcError as err:
        raise call_error(err, f"annotator Annotate at {ep.address}") from None
