"""`moaa annotate`: samples.jsonl -> TRL preference rows, through a running annotator's AnnotateStream.

Input rows (what `moaa sample` writes): {"id", "prompt": [messages], "candidates": [{"text", "model"}]}.
Output rows: TRL's conversational preference format, {"prompt": [...], "chosen": [assistant message],
"rejected": [assistant message]}, plus id, scores, judges and agreement.

Resumable by row id: each output line is one `write`, flushed and fsynced before the row counts as
done; a torn last line from a killed run is cut off and redone. Pairs the judges could not separate
and rows the annotator refused as invalid go to `<out>.skipped.jsonl` (done, not retried); transient
failures go to `<out>.errors.jsonl` and are retried by the next run. `<out>.report.json` holds the
per-judge position bias, agreement and length correlation over the run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterator

import grpc
from tqdm import tqdm

from moaa.errors import TransientError, UserError
from moaa.services.common.tls import open_channel
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2

PERMANENT = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND"}


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    try:
        fh = path.open(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read {what} {path}: {err.strerror}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path}:{n}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object per line")
            yield n, row


def done_ids(path: Path) -> set[str]:
    """Ids already in an output file. Rows are written as `line + newline` in one write, so bytes after
    the last newline, or a line that is not JSON, are a torn write of a killed run: cut off, redone."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    ids, keep = set(), 0
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is torn (or empty)
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            break
        if isinstance(row, dict):
            ids.add(str(row.get("id")))
        keep += len(line) + 1
    if keep < len(data):
        with path.open("rb+") as fh:
            fh.truncate(keep)
    return ids


class Appender:
    """Append-only JSONL writer: one write per row, flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def write(self, obj: dict) -> None:
        if self._fh is None:
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def to_request(row: dict, where: str, ensemble: str = "", mode: str = "") -> annotator_pb2.AnnotateRequest:
    if "id" not in row:
        raise UserError(f"{where}: row has no 'id'")
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    cands = row.get("candidates")
    if not isinstance(prompt, list) or not isinstance(cands, list):
        raise UserError(f"{where}: row {row['id']!r} needs 'prompt' (a list of messages) and 'candidates' (a list)")
    try:
        return annotator_pb2.AnnotateRequest(
            id=str(row["id"]), ensemble=ensemble, mode=mode,
            prompt=[common_pb2.Message(role=m["role"], content=m["content"]) for m in prompt],
            candidates=[annotator_pb2.Candidate(id=str(c.get("id", i)), text=c.get("text", ""), model=c.get("model", ""))
                        for i, c in enumerate(cands)])
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{where}: row {row['id']!r} has a malformed message or candidate ({err})") from None


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def judges_summary(resp) -> list[dict]:
    return [{"judge": j.judge, "model": j.model, "scores": {s.candidate_id: _num(s.score) for s in j.scores},
             "abstentions": j.abstentions, "position_bias": _num(j.position_bias),
             "length_correlation": _num(j.length_correlation), "agreement": _num(j.agreement),
             "template": j.template, "template_hash": j.template_hash, "permutation_seed": j.permutation_seed}
            for j in resp.judges]


def preference_row(row: dict, resp) -> dict:
    texts = {c.id or str(i): c for i, c in enumerate(row["_req"].candidates)}
    chosen, rejected = texts[resp.chosen_id], texts[resp.rejected_id]
    combined = {c.candidate_id: _num(c.score) for c in resp.combined}
    prompt = [{"role": m.role, "content": m.content} for m in row["_req"].prompt]
    return {
        "id": resp.id, "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen.text}],
        "rejected": [{"role": "assistant", "content": rejected.text}],
        "score_chosen": combined[resp.chosen_id], "score_rejected": combined[resp.rejected_id],
        "margin": round(resp.margin, 4), "agreement": _num(resp.agreement), "scores": combined,
        "chosen_model": chosen.model, "rejected_model": rejected.model,
        "judges": judges_summary(resp), "ensemble": resp.ensemble, "mode": resp.mode, "combine": resp.combine,
        "seed": resp.seed,
    }


class RunReport:
    """Per-judge bias and agreement over a run (means over the prompts where each was defined)."""

    def __init__(self):
        self.judges: dict[str, dict[str, list[float]]] = {}
        self.counts = {"pairs": 0, "skipped": 0, "invalid": 0, "errors": 0, "already_done": 0}
        self.skip_reasons: dict[str, int] = {}

    def add(self, resp) -> None:
        for j in resp.judges:
            d = self.judges.setdefault(j.judge, {"position_bias": [], "length_correlation": [], "agreement": [],
                                                  "abstentions": [], "order_flip_rate": []})
            for key in ("position_bias", "length_correlation", "agreement", "order_flip_rate"):
                v = getattr(j, key)
                if not math.isnan(v):
                    d[key].append(v)
            d["abstentions"].append(j.abstentions)

    def summary(self) -> dict:
        judges = {}
        for name, d in self.judges.items():
            judges[name] = {k: (round(sum(v) / len(v), 4) if v else None) for k, v in d.items() if k != "abstentions"}
            judges[name]["abstentions"] = sum(d["abstentions"])
        return {**self.counts, "skip_reasons": self.skip_reasons, "judges": judges}


async def annotate_file(address: str, in_path: str, out_path: str, *, ensemble: str = "", mode: str = "",
                        token: str | None = None, tls_ca: str | None = None, tls: bool = False,
                        progress: bool = True) -> dict:
    src, out = Path(in_path), Path(out_path)
    skipped_path = out.with_name(out.name + ".skipped.jsonl")
    errors_path = out.with_name(out.name + ".errors.jsonl")
    done = done_ids(out) | done_ids(skipped_path)
    if errors_path.exists():
        errors_path.unlink()  # failures of the last run are retried now
    rows: dict[str, dict] = {}
    report = RunReport()
    for n, row in read_jsonl(src, "samples"):
        req = to_request(row, f"{src}:{n}", ensemble, mode)
        if req.id in done:
            report.counts["already_done"] += 1
            continue
        if req.id in rows:
            raise UserError(f"{src}:{n}: row id {req.id!r} appears twice")
        rows[req.id] = {"_req": req}
    writer, skipper, failer = Appender(out), Appender(skipped_path), Appender(errors_path)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    bar = tqdm(total=len(rows), desc="annotate", unit="row", disable=not progress)

    async def requests():
        for r in rows.values():
            yield r["_req"]

    try:
        async with open_channel(address, ca_file=tls_ca, tls=tls) as channel:
            stub = annotator_pb2_grpc.AnnotatorStub(channel)
            try:
                async for res in stub.AnnotateStream(requests(), metadata=metadata):
                    row = rows.pop(res.id, None)
                    if row is None:
                        continue
                    if res.WhichOneof("result") == "error":
                        if res.error.code in PERMANENT:
                            report.counts["invalid"] += 1
                            skipper.write({"id": res.id, "reason": f"{res.error.code}: {res.error.message}"})
                        else:
                            report.counts["errors"] += 1
                            failer.write({"id": res.id, "error": f"{res.error.code}: {res.error.message}"})
                    elif res.response.skipped:
                        report.counts["skipped"] += 1
                        report.add(res.response)
                        key = res.response.skip_reason.split(":")[0]
                        report.skip_reasons[key] = report.skip_reasons.get(key, 0) + 1
                        skipper.write({"id": res.id, "reason": res.response.skip_reason,
                                       "scores": {c.candidate_id: _num(c.score) for c in res.response.combined},
                                       "judges": judges_summary(res.response)})
                    else:
                        report.counts["pairs"] += 1
                        report.add(res.response)
                        writer.write(preference_row(row, res.response))
                    bar.update(1)
            except grpc.aio.AioRpcError as err:
                msg = f"annotator {address}: {err.code().name}: {err.details()} ({len(rows)} rows left; rerun to resume)"
                if err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.PERMISSION_DENIED):
                    raise UserError(msg) from None
                raise TransientError(msg) from None
    finally:
        bar.close()
        for w in (writer, skipper, failer):
            w.close()
        summary = report.summary()
        Path(out.with_name(out.name + ".report.json")).write_text(json.dumps(summary, indent=2) + "\n")
    if report.counts["errors"]:
        raise TransientError(f"{report.counts['errors']} rows failed (see {errors_path}); rerun to retry them")
    return summary
