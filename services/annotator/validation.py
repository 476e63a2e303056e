"""AnnotateRequest (proto) -> Job, checked. Every problem raises InvalidArgument saying what to change."""
from __future__ import annotations

import hashlib

from moaa.prompts import answer_key
from moaa.services.common.errors import InvalidArgument
from moaa.services.common.validation import messages_to_dicts
from moaa.services.config import AnnotatorConfig, MoaaConfig

from .engine import MODES, Job
from .judging import Candidate
from .stats import judge_seed


def _candidate(c, i: int, field: str, limit: int) -> Candidate:
    if not c.text.strip():
        raise InvalidArgument(f"{field} is empty: every candidate needs text (drop empty answers before annotating)")
    size = len(c.text.encode("utf-8"))
    if size > limit:
        raise InvalidArgument(f"{field} has {size} bytes, over max_candidate_bytes={limit}: "
                              "shorten it or raise max_candidate_bytes in the annotator's server config")
    return Candidate(id=c.id or str(i), text=c.text, model=c.model)


def build_job(req, config: MoaaConfig, server: AnnotatorConfig, request_id: str = "") -> Job:
    prompt = messages_to_dicts(req.prompt, field="prompt", max_chars=server.max_prompt_chars)
    n = len(req.candidates)
    if n < 2:
        raise InvalidArgument(f"candidates has {n} entr{'y' if n == 1 else 'ies'}: send at least 2 answers to compare")
    if n > server.max_candidates:
        raise InvalidArgument(f"candidates has {n} entries, over max_candidates={server.max_candidates}: "
                              "send fewer or raise max_candidates in the annotator's server config")
    cands = [_candidate(c, i, f"candidates[{i}]", server.max_candidate_bytes) for i, c in enumerate(req.candidates)]
    ids = [c.id for c in cands]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise InvalidArgument(f"candidate ids must be unique; repeated: {', '.join(dup)}")
    first: dict[str, str] = {}
    for c in cands:   # a pair of one text teaches DPO nothing; its margin would be the judges' position bias
        same = first.setdefault(answer_key(c.text), c.id)
        if same != c.id:
            raise InvalidArgument(f"candidates {same!r} and {c.id!r} have the same text: send each distinct answer "
                                  "once (moaa annotate and the gateway's Sample drop duplicates)")
    try:
        ens_name, ens = config.ensemble(req.ensemble or None)
    except KeyError as err:
        raise InvalidArgument(str(err.args[0]) + " (set ensembles/default_ensemble in the config)") from None
    by_name = {j.name: j for j in ens.judges}
    if req.judges:
        unknown = [j for j in req.judges if j not in by_name]
        if unknown:
            raise InvalidArgument(f"unknown judge(s) {', '.join(map(repr, unknown))} in ensemble {ens_name!r}; "
                                  f"its judges: {', '.join(by_name)}")
        judges = [by_name[j] for j in dict.fromkeys(req.judges)]
    else:
        judges = list(ens.judges)
    mode = req.mode or ens.mode
    if mode not in MODES:
        raise InvalidArgument(f"mode {req.mode!r} is unknown: use one of {', '.join(MODES)} (or leave it empty)")
    reference = None
    notes = []
    if req.HasField("reference"):
        reference = _candidate(req.reference, n, "reference", server.max_candidate_bytes)
        if mode == "pointwise":
            notes.append("the reference answer is used by pairwise judges only; mode 'pointwise' ignored it")
    if req.HasField("seed"):
        seed = req.seed
    else:  # stable per row, so a rerun shows every judge the same order
        key = req.id or hashlib.sha256(repr((prompt, ids)).encode()).hexdigest()
        seed = judge_seed(ens.seed, key)
    return Job(prompt=prompt, candidates=cands, ensemble_name=ens_name, ensemble=ens, judges=judges, mode=mode,
               seed=seed, id=req.id, request_id=request_id or req.request_id, reference=reference, notes=notes)
