"""`moaa judge-eval`: how often the ensemble, and each judge alone, agrees with human preference labels.

Input rows: {"id", "prompt": [messages] or str, "chosen": [assistant message] or str, "rejected": ...}
(TRL's preference format). Each row is asked in both orders (chosen shown first, then rejected first).
Per order and judge: agree (labelled chosen scored higher), disagree, tie, or abstained (no readable score for
one of the two). Accuracy is over the calls the judge decided, a tie counting half; abstentions are counted
apart, never as ties, so a judge that never gave a readable verdict has no accuracy. `consistent` is the share
of rows a judge decided in both orders where it decided the same way. A call decided without a judge whose
backend failed (the ensemble's `min_judges` allowed it) is counted per judge model (`judge_failures`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from moaa.errors import TransientError, UserError
from moaa.jsonl import read_input
from moaa.progress import StageProgress
from moaa.prompts import answer_key
from moaa.v1 import annotator_pb2, annotator_pb2_grpc, common_pb2

from .endpoint import Endpoint
from .errors import is_bad_input
from .pairs import failed_judge_models, sample_prompt
from .window import windowed

ENSEMBLE = "(ensemble)"


def _text(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return value[-1]["content"]
    raise UserError(f"{where}: expected a string or a list of messages")


def build_requests(path: Path, ensemble: str = "", mode: str = "") -> list[annotator_pb2.AnnotateRequest]:
    reqs = []
    for n, row in read_input(path, "labelled data", stdin=True):
        where = f"{path}:{n}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise UserError(f"{where}: row has no {key!r}")
        rid = str(row.get("id", n))
        prompt = [common_pb2.Message(**m) for m in sample_prompt(row, where)]
        good = annotator_pb2.Candidate(id="chosen", text=_text(row["chosen"], where))
        bad = annotator_pb2.Candidate(id="rejected", text=_text(row["rejected"], where))
        if answer_key(good.text) == answer_key(bad.text):   # a label no judge can agree or disagree with
            raise UserError(f"{where}: row {rid!r}: chosen and rejected are the same text")
        for order, cands in (("chosen_first", [good, bad]), ("rejected_first", [bad, good])):
            reqs.append(annotator_pb2.AnnotateRequest(id=f"{rid}\t{order}", prompt=prompt, candidates=cands,
                                                      ensemble=ensemble, mode=mode))
    return reqs


OUTCOMES = ("agree", "disagree", "tie", "abstained")


def _outcome(scores: dict[str, float]) -> str:
    a, b = scores.get("chosen", math.nan), scores.get("rejected", math.nan)
    if math.isnan(a) or math.isnan(b):
        return "abstained"
    return "tie" if a == b else "agree" if a > b else "disagree"


def _accuracy(d: dict) -> float | None:
    decided = d["agree"] + d["disagree"] + d["tie"]
    return round((d["agree"] + 0.5 * d["tie"]) / decided, 4) if decided else None


def summarise(results: dict[str, dict[str, str]]) -> dict:
    """results: request id -> {judge or ENSEMBLE: outcome}."""
    by_judge: dict[str, dict] = {}
    rows: dict[str, dict[str, dict[str, str]]] = {}
    for rid, outcomes in results.items():
        row, order = rid.split("\t")
        rows.setdefault(row, {})[order] = outcomes
        for judge, outcome in outcomes.items():
            d = by_judge.setdefault(judge, {**dict.fromkeys(OUTCOMES, 0), "by_order": {}})
            d[outcome] += 1
            o = d["by_order"].setdefault(order, dict.fromkeys(OUTCOMES, 0))
            o[outcome] += 1
    out = {}
    for judge, d in by_judge.items():
        both = [r for r in rows.values() if r.get("chosen_first", {}).get(judge, "abstained") != "abstained"
                and r.get("rejected_first", {}).get(judge, "abstained") != "abstained"]
        consistent = sum(r["chosen_first"][judge] == r["rejected_first"][judge] for r in both)
        out[judge] = {
            "accuracy": _accuracy(d), "agree": d["agree"], "disagree": d["disagree"], "ties": d["tie"],
            "abstained": d["abstained"], "consistent": round(consistent / len(both), 4) if both else None,
            "by_order": {k: _accuracy(v) for k, v in d["by_order"].items()},
        }
    return {"rows": len(rows), "judges": out}


async def judge_eval(ep: Endpoint, in_path: str, *, ensemble: str = "", mode: str = "", progress: bool = True,
                     window: int = 32) -> dict:
    reqs = build_requests(Path(in_path), ensemble, mode)
    if not reqs:
        raise UserError(f"{in_path} has no rows")
    results: dict[str, dict[str, str]] = {}
    errors: list[str] = []
    transient = 0
    judge_failures: dict[str, int] = {}   # judge model -> calls decided without it (its backend failed)

    with StageProgress("judge-eval", len(reqs), 0, unit="call", quiet=not progress) as bar:
        async with ep.channel() as channel:
            stub = annotator_pb2_grpc.AnnotatorStub(channel)
            async for res in windowed(stub.AnnotateStream, reqs, ep=ep, what="annotator", window=window):
                bar.advance(failed=res.WhichOneof("result") == "error")
                if res.WhichOneof("result") == "error":
                    errors.append(f"{res.id.split(chr(9))[0]}: {res.error.code}: {res.error.message}")
                    transient += not is_bad_input(res.error.code)
                    continue
                resp = res.response
                outcomes = {ENSEMBLE: _outcome({c.candidate_id: c.score for c in resp.combined})}
                for j in resp.judges:
                    outcomes[j.judge] = _outcome({s.candidate_id: s.score for s in j.scores})
                results[res.id] = outcomes
                for model in failed_judge_models(resp):
                    judge_failures[model] = judge_failures.get(model, 0) + 1
    if not results:
        raise failure({"errors": errors, "transient_errors": transient}, "no row could be judged")
    summary = summarise(results)
    summary["judge_failures"] = judge_failures
    summary["errors"] = errors
    summary["transient_errors"] = transient
    return summary


def failure(summary: dict, what: str = "") -> UserError | TransientError | None:
    """The error a run with failed calls ends with (after its table): a failed call is never a silent skip.
    Transient (the judges' backends down) when any failure was, so a rerun is the fix."""
    errors = summary.get("errors") or []
    if not errors:
        return None
    msg = (f"{what or f'{len(errors)} calls failed; the accuracies above leave them out'}: "
           + "; ".join(errors[:3]))
    if summary.get("transient_errors"):
        return TransientError(msg + "; rerun when the annotator's judges are back")
    return UserError(msg)


def check_out(path: str) -> None:
    """--out may replace an earlier summary, never a file that is not one; its folder is made now, before
    the judging (as `moaa annotate` makes its --out's), not found missing after it."""
    p = Path(path)
    if not p.exists():
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {path}: its folder cannot be made ({err.strerror})") from None
        return
    try:
        doc = json.loads(p.read_text())
        ours = isinstance(doc, dict) and {"rows", "judges"} <= doc.keys()
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise UserError(f"{path} is not a judge-eval summary; give another --out path or remove that file")


def format_table(summary: dict) -> str:
    lines = [f"{summary['rows']} labelled rows, both orders asked",
             f"{'judge':<20} {'accuracy':>8} {'agree':>6} {'disagree':>8} {'ties':>5} {'abstained':>9} {'consistent':>10}"]
    judges = summary["judges"]
    for name in [ENSEMBLE, *sorted(k for k in judges if k != ENSEMBLE)]:
        if name not in judges:
            continue
        d = judges[name]
        acc = "-" if d["accuracy"] is None else f"{d['accuracy']:.3f}"
        cons = "-" if d["consistent"] is None else f"{d['consistent']:.3f}"
        lines.append(f"{name:<20} {acc:>8} {d['agree']:>6} {d['disagree']:>8} {d['ties']:>5} {d['abstained']:>9} "
                     f"{cons:>10}")
    failed = summary.get("judge_failures") or {}
    if failed:
        lines.append("decided without a judge whose backend failed (the ensemble's min_judges allowed it; its row "
                     "above is the other judges'): " + ", ".join(f"{m} in {n} calls" for m, n in sorted(failed.items())))
    if summary.get("errors"):
        lines.append(f"{len(summary['errors'])} calls failed, e.g. {summary['errors'][0]}")
    return "\n".join(lines)
