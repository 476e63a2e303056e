"""Samples -> annotation requests -> preference rows: the ONE preference row schema.

Input, a samples row (what `moaa sample` writes; other samplers' names are accepted too):
    {"id", "prompt": [messages] or str, "candidates": [{"id", "text", "model"} or str]}
Empty and duplicate answers are not sent; fewer than two distinct answers is a skip (too_few_candidates).

Output, TRL's conversational preference format plus one provenance block:
    {"id", "prompt": [messages], "chosen": [assistant message], "rejected": [assistant message],
     "annotation": {chosen_id, rejected_id, chosen_model, rejected_model, score_chosen, score_rejected,
                    margin, agreement, candidates: [ids, in the order sent], combined: {id: score},
                    judges: [{judge, model, scores: {id: score or null}, abstain_reasons: {id: why}
                              (the unreadable ones), abstentions, position_bias,
                              length_correlation, agreement, order_flip_rate, template, template_hash,
                              permutation_seed}],
                    ensemble, mode, combine, seed,
                    failures: [{model, cause, message}] (judges' backends that failed; the row was decided
                              without them, as min_judges allows), note (why, or how the combine rule fell back)},
     "usage": {model: {prompt_tokens, completion_tokens, requests}}}   (what judging this row cost)
A pair the judges could not separate becomes a skip record {"id", "reason", "annotation", "usage"}.
`moaa annotate` and the pipeline's pairs stage both write these; `read_pairs` reads them back.
"""
from __future__ import annotations

import math
from typing import Any

from moaa.errors import UserError
from moaa.prompts import RowError, answer_key, as_messages
from moaa.usage import add_usage
from moaa.v1 import annotator_pb2, common_pb2

SAMPLE_FIELDS = ("candidates", "samples", "completions", "answers")
PAIR_KEYS = ("id", "prompt", "chosen", "rejected", "annotation", "usage")
SKIP_KEYS = ("id", "reason")


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 4)


def sample_prompt(row: dict, where: str = "") -> list[dict]:
    """The prompt messages of a samples (or answers) row, read as the prompt loader reads messages (text
    parts joined, `developer` as system, ShareGPT's from/value)."""
    try:
        return as_messages(row.get("prompt") or row.get("messages"), "prompt")
    except RowError as err:
        raise UserError(f"{where or 'row'}: row {row.get('id')!r}: {err} (give 'prompt' as a string or a list "
                        "of {role, content} messages)") from None


def _answers_field(row: dict) -> str | None:
    """The field that holds a samples row's answers: the first of SAMPLE_FIELDS the row has (one rule for
    reading and checking, so a row with two such fields is read from the field that was checked)."""
    return next((f for f in SAMPLE_FIELDS if f in row), None)


def _answer_text(item):
    """An answer's text: the item itself, or its "text" (else "content") value; not checked here."""
    return (item["text"] if "text" in item else item.get("content")) if isinstance(item, dict) else item


def sample_items(row: dict) -> list[dict]:
    """The candidate answers of a samples row as {"id", "text", "model"}, whatever the sampler named them
    (what is not an answer reads as an empty one; `malformed_items` says why)."""
    field = _answers_field(row)
    items = row[field] if field else []
    out = []
    for i, it in enumerate(items if isinstance(items, list) else []):
        text = _answer_text(it)
        meta = it if isinstance(it, dict) else {}
        out.append({"id": str(meta.get("id") or f"s{i}"), "text": text if isinstance(text, str) else "",
                    "model": str(meta.get("model") or "")})
    return out


def malformed_items(row: dict) -> str | None:
    """What is wrong with a samples row's answers (a misspelt key would read as no answer at all, a skip
    that a rerun with the fixed file then counts as done), or None."""
    field = _answers_field(row)
    if field is None:
        return f"no answers: give them as {SAMPLE_FIELDS[0]!r} (or {', '.join(map(repr, SAMPLE_FIELDS[1:]))})"
    items = row[field]
    if not isinstance(items, list):
        return f"{field!r} is {type(items).__name__}: give a list of answers, strings or {{\"text\": ...}}"
    for i, it in enumerate(items):
        if not isinstance(_answer_text(it), str):
            return f"{field}[{i}] is no answer: give a string or {{\"text\": ...}}"
    return None


def sample_texts(row: dict) -> list[str]:
    return [c["text"] for c in sample_items(row)]


def annotate_request(row: dict, *, ensemble: str = "", mode: str = "", model: str = "",
                     where: str = "") -> tuple[annotator_pb2.AnnotateRequest | None, str | None]:
    """(request, None), or (None, skip reason) when fewer than two distinct non-empty answers remain."""
    if "id" not in row:
        raise UserError(f"{where or 'row'}: row has no 'id'")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):   # null, an object: a broken row
        raise UserError(f"{where or 'row'}: row id {row['id']!r} is not a string or an integer")
    prompt = sample_prompt(row, where)
    problem = malformed_items(row)
    if problem:
        raise UserError(f"{where or 'row'}: row {row['id']!r}: {problem}")
    items = sample_items(row)
    keep, seen = [], set()
    for c in items:
        key = answer_key(c["text"])
        if key and key not in seen:
            seen.add(key)
            keep.append(c)
    if len(keep) < 2:
        return None, f"too_few_candidates: {len(keep)} distinct non-empty answers of {len(items)}"
    req = annotator_pb2.AnnotateRequest(
        id=str(row["id"]), ensemble=ensemble, mode=mode,
        prompt=[common_pb2.Message(role=m["role"], content=m["content"]) for m in prompt],
        candidates=[annotator_pb2.Candidate(id=c["id"], text=c["text"], model=c["model"] or model) for c in keep])
    return req, None


def provenance(req: annotator_pb2.AnnotateRequest, resp: annotator_pb2.AnnotateResponse) -> dict[str, Any]:
    """The annotation block: scores, agreement, each judge, and how the ensemble was run."""
    combined = {c.candidate_id: _num(c.score) for c in resp.combined}
    models = {c.id: c.model for c in req.candidates}
    out = {
        "candidates": [c.id for c in req.candidates],
        "combined": combined,
        "margin": _num(resp.margin), "agreement": _num(resp.agreement),
        "judges": [{"judge": j.judge, "model": j.model,
                    "scores": {s.candidate_id: (None if s.abstained else _num(s.score)) for s in j.scores},
                    "abstain_reasons": {s.candidate_id: s.abstain_reason for s in j.scores if s.abstained},
                    "abstentions": j.abstentions, "position_bias": _num(j.position_bias),
                    "length_correlation": _num(j.length_correlation), "agreement": _num(j.agreement),
                    "order_flip_rate": _num(j.order_flip_rate), "template": j.template,
                    "template_hash": j.template_hash, "permutation_seed": j.permutation_seed}
                   for j in resp.judges],
        "ensemble": resp.ensemble, "mode": resp.mode, "combine": resp.combine, "seed": resp.seed,
        # a judge whose backend failed, with min_judges below the ensemble's size: the row was decided without it
        "failures": [{"model": f.model, "cause": f.cause, "message": f.message} for f in resp.failures],
        "note": resp.note,
    }
    if not resp.skipped:
        out = {"chosen_id": resp.chosen_id, "rejected_id": resp.rejected_id,
               "chosen_model": models.get(resp.chosen_id, ""), "rejected_model": models.get(resp.rejected_id, ""),
               "score_chosen": combined.get(resp.chosen_id), "score_rejected": combined.get(resp.rejected_id),
               **out}
    return out


def pair_row(req: annotator_pb2.AnnotateRequest, resp: annotator_pb2.AnnotateResponse) -> dict[str, Any]:
    """A preference row in the one schema (module docstring), with the tokens it cost (`usage`)."""
    text = {c.id: c.text for c in req.candidates}
    return {
        "id": req.id,
        "prompt": [{"role": m.role, "content": m.content} for m in req.prompt],
        "chosen": [{"role": "assistant", "content": text[resp.chosen_id]}],
        "rejected": [{"role": "assistant", "content": text[resp.rejected_id]}],
        "annotation": provenance(req, resp),
        "usage": usage_record(resp.usage),
    }


def skip_info(req: annotator_pb2.AnnotateRequest, resp: annotator_pb2.AnnotateResponse) -> dict[str, Any]:
    """What a skip record carries besides its id and reason."""
    return {"annotation": provenance(req, resp), "usage": usage_record(resp.usage)}


def failed_judge_models(resp) -> list[str]:
    """The judge models whose backends failed while an AnnotateResponse was still decided (its ensemble's
    min_judges let the others decide), each once: what `moaa annotate`, `moaa eval` and `moaa judge-eval` count."""
    return list(dict.fromkeys(f.model for f in resp.failures))


def usage_record(usages, into: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """Tokens a row cost, per model, from repeated ModelUsage: journaled with the row (`usage`); added to
    `into` when given (a row made of several calls)."""
    out: dict[str, dict[str, int]] = {} if into is None else into
    for mu in usages:
        add_usage(out, mu.model, mu.usage.prompt_tokens, mu.usage.completion_tokens,
                  int(getattr(mu, "requests", 1) or 1))
    return out


def read_pairs(path) -> list[dict]:
    """Preference rows of a file written by `moaa annotate` or the pipeline, checked against the one schema."""
    from moaa.jsonl import iter_scan

    rows = []
    for n, row in iter_scan(path):
        problem = not_a_pair(row)
        if problem:
            raise UserError(f"{path}:{n}: {problem}")
        rows.append(row)
    return rows


def not_a_pair(row: dict, keys: tuple[str, ...] = PAIR_KEYS) -> str | None:
    """Why `row` is not a preference row (or, with SKIP_KEYS, a skip record), or None."""
    missing = [k for k in keys if k not in row]
    kind = "skip record" if keys == SKIP_KEYS else "preference row"
    return f"not a moaa {kind} (missing {', '.join(missing)})" if missing else None


def judge_scores(row: dict) -> dict[str, list[float | None]]:
    """judge -> its scores of the row's candidates, in the order they were sent (for agreement plots)."""
    ann = row.get("annotation") or {}
    order = ann.get("candidates") or []
    return {j["judge"]: [j["scores"].get(cid) for cid in order] for j in ann.get("judges", [])}
