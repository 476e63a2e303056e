"""Evaluation runs: judge model-vs-baseline pairs (resumable), grade single answers, write win rates.

Judgments are stored keyed by "<model>~<baseline>~<prompt id>", so a killed eval resumes without
judging a pair twice. `eval.json` records, per comparison, its judge and a hash of each side's answers:
a re-run with another judge or other answers under the same names is refused rather than handed the old
verdicts. Abstentions (a judge unreadable in both orders) are recorded as skipped rows and
counted beside each win rate, as are failed judgments and prompts one side has no answer for.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

from moaa.client.pairs import sample_prompt, sample_texts
from moaa.errors import UserError
from moaa.files import atomic_write_json, make_folder, read_json
from moaa.jsonl import read_input, read_rows
from moaa.prompts import answer_key, content_id

from ..budget import TokenLedger
from moaa.progress import StageProgress
from ..store import DatasetStore
from .grading import grading_summary
from .winrate import summarize

ANSWER_FIELDS = ("answer", "output", "response", "completion", "text")


def load_answers(path: str | Path) -> dict[str, tuple[list[dict], str]]:
    """id -> (prompt messages, answer) from a JSONL file of answers.

    Accepts rows {id?, prompt|messages|instruction, answer|output|response|completion|text}, SFT rows
    whose messages end with the assistant's answer, and `moaa sample` rows (first sample).
    """
    path = Path(path)
    out: dict[str, tuple[list[dict], str]] = {}
    first_line: dict[str, int] = {}
    for lineno, row in read_input(path, "answers"):
        prompt, text = None, None
        if sample_texts(row):
            prompt, text = sample_prompt(row), sample_texts(row)[0]
        else:
            text = next((row[f] for f in ANSWER_FIELDS if isinstance(row.get(f), str)), None)
            msgs = row.get("prompt") or row.get("messages") or row.get("instruction")
            if isinstance(msgs, str):
                msgs = [{"role": "user", "content": msgs}]
            if text is None and isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
                msgs, text = msgs[:-1], msgs[-1]["content"]
            prompt = msgs
        if not isinstance(prompt, list) or not prompt or text is None:
            raise UserError(f"{path}: line {lineno}: expected a prompt (prompt/messages/instruction) and an answer "
                            f"({'/'.join(ANSWER_FIELDS)}, or messages ending with the assistant's turn)")
        rid = str(row.get("id") or content_id(prompt))
        if rid in first_line:  # a second answer would silently replace the first
            what = f"answer id {rid!r}" if row.get("id") else "a second answer to the same prompt (rows without ids)"
            raise UserError(f"{path}: line {lineno}: {what} appears twice (first at line {first_line[rid]}); "
                            "keep one answer per prompt")
        first_line[rid] = lineno
        out[rid] = (prompt, text)
    if not out:
        raise UserError(f"{path}: no answers")
    return out


def _answers_sha256(answers: dict[str, tuple[list[dict], str]]) -> str:
    doc = json.dumps(sorted(answers.items()), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def guard_comparison(out: Path, judge: str, model: str, baseline: str, answers_model: dict, answers_base: dict) -> None:
    """Record what this comparison is judged by and on in `<out>/eval.json`; refuse a folder whose stored
    verdicts for the same names came from another judge or other answers (they would be resumed as these)."""
    path = out / "eval.json"
    record = read_json(path) or {}
    now = {"judge": judge, "model_sha256": _answers_sha256(answers_model),
           "baseline_sha256": _answers_sha256(answers_base)}
    old = record.get(f"{model}~{baseline}")
    if old and old != now:
        what = (f"judged by {old['judge']}, not {judge}" if old["judge"] != now["judge"] else
                "of other answers of " + " and ".join(n for n, k in ((model, "model_sha256"), (baseline, "baseline_sha256"))
                                                       if old[k] != now[k]))
        raise UserError(f"{out} holds {model} vs {baseline} {what}; use another --out, or other --name / "
                        "--baseline-name for a new comparison")
    record[f"{model}~{baseline}"] = now
    atomic_write_json(path, record)


def _verdict_without_judge(model_text: str, base_text: str):
    """A pair no judge needs (None otherwise): an empty answer loses (both empty: a tie), and the same answer
    on both sides is a tie (a model often gives its base's greedy answer; the annotator refuses a pair of one
    text, and a judge could only show its position bias on it)."""
    from .judges import PairVerdict

    m, b = answer_key(model_text), answer_key(base_text)
    if m and b:
        return PairVerdict(0.5, ("same answer", "same answer"), False, same=True) if m == b else None
    pref = 0.5 if bool(m) == bool(b) else (1.0 if m else 0.0)
    return PairVerdict(pref, ("empty answer", "empty answer"), False, empty=True)


async def judge_pairs(judge, model: str, baseline: str, answers_model: dict, answers_base: dict,
                      store: DatasetStore, *, concurrency: int = 4, quiet: bool = False,
                      ledger: TokenLedger | None = None) -> int:
    """Each prompt's pair judged once; the verdict's tokens are journaled with its row (and added to
    `ledger`), so a killed evaluation's ledger is rebuilt from its rows like the other stages'.
    Returns how many prompts could not be judged because one side has no answer for them."""
    common = [rid for rid in answers_model if rid in answers_base]
    if not common:
        raise UserError(f"no prompt ids in common between {model} and {baseline}")
    missing = len(answers_model) + len(answers_base) - 2 * len(common)
    keys = {rid: f"{model}~{baseline}~{rid}" for rid in common}
    todo = [rid for rid in common if not store.is_done(keys[rid])]
    progress = StageProgress(f"eval {model} vs {baseline}", len(common), len(common) - len(todo), quiet=quiet)
    sem = asyncio.Semaphore(concurrency)

    async def one(rid: str) -> None:
        prompt, mt = answers_model[rid]
        bt = answers_base[rid][1]
        async with sem:
            try:
                # an empty answer loses without asking (judges and the annotator refuse empty candidates)
                v = _verdict_without_judge(mt, bt) or await judge.prefer(prompt, mt, bt)
            except Exception as err:  # one failed judgment is recorded and retried on the next run
                store.fail(keys[rid], f"{type(err).__name__}: {err}")
                progress.advance(failed=True)
                return
        if ledger is not None:
            for m, u in v.usage.items():
                ledger.add(store.stage, m, u, requests=u["requests"])
        if v.preference is None:
            store.skip(keys[rid], "judge_abstained: unreadable verdict in both orders", usage=v.usage,
                       model=model, baseline=baseline)
            progress.advance(skipped=True)
            return
        store.write({"id": keys[rid], "prompt_id": rid, "model": model, "baseline": baseline,
                     "preference": v.preference, "orders": list(v.orders), "inconsistent": v.inconsistent,
                     "abstained_orders": v.abstained_orders, "empty": v.empty, "same": v.same, "judge_failures": v.judge_failures,
                     "len_model": len(mt), "len_baseline": len(bt), "judge": judge.name, "usage": v.usage})
        progress.advance()

    with progress:
        await asyncio.gather(*(one(rid) for rid in todo))
    return missing


def sample_prompt_id(key: str) -> str:
    """The prompt of a sampled answer's key "<id>#<j>" (see all_answers_from_samples)."""
    return key.rsplit("#", 1)[0]


def winrates_from_store(store: DatasetStore, pairs: list[tuple[str, str]], *, n_resamples: int = 1000,
                        missing: dict | None = None, sampled: frozenset = frozenset()) -> list[dict]:
    """One win-rate record per pair with any judgment, abstention, failure or missing answer.
    `sampled`: pairs whose rows are k samples per prompt ("<id>#<j>"): their intervals resample prompts."""
    out = []
    rows = list(store.iter_rows())
    abstained = [r["id"] for r in read_rows(store.folder / "skipped.jsonl")] \
        if (store.folder / "skipped.jsonl").exists() else []
    for model, baseline in pairs:
        prefix = f"{model}~{baseline}~"
        # by id, not by the order rows were written in: a resumed run's intervals equal an uninterrupted one's
        sel = sorted((r for r in rows if r["model"] == model and r["baseline"] == baseline), key=lambda r: r["id"])
        counts = {"abstained": sum(k.startswith(prefix) for k in abstained),
                  "failed": sum(k.startswith(prefix) for k in store.failed),
                  "missing": (missing or {}).get((model, baseline), 0)}
        if not sel and not any(counts.values()):
            continue
        groups = [sample_prompt_id(r["prompt_id"]) for r in sel] if (model, baseline) in sampled else None
        rep = summarize(model, baseline, [r["preference"] for r in sel], [r["len_model"] for r in sel],
                        [r["len_baseline"] for r in sel], n_resamples=n_resamples,
                        inconsistent=sum(bool(r["inconsistent"]) for r in sel), prompt_ids=groups,
                        one_order=sum(bool(r.get("abstained_orders")) for r in sel),
                        empty=sum(bool(r.get("empty")) for r in sel), same=sum(bool(r.get("same")) for r in sel),
                        fewer_judges=sum(bool(r.get("judge_failures")) for r in sel), **counts)
        out.append(rep.to_json())
    return out


async def grade_answers(grader, answers: dict[str, dict], out_dir: Path, *, concurrency: int = 4,
                        quiet: bool = False) -> dict:
    """MT-Bench-style 1-10 grades per model; answers: model -> {id: (prompt, text)}. Resumable."""
    store = DatasetStore(out_dir / "grades", stage="grades", fmt="generations").open()
    sem = asyncio.Semaphore(concurrency)
    todo = [(m, rid) for m, ans in answers.items() for rid in ans if not store.is_done(f"{m}~{rid}")]
    progress = StageProgress("grading", sum(len(a) for a in answers.values()),
                             sum(len(a) for a in answers.values()) - len(todo), quiet=quiet)

    async def one(model: str, rid: str) -> None:
        prompt, text = answers[model][rid]
        async with sem:
            try:
                score = await grader.grade(prompt, text)
            except Exception as err:
                store.fail(f"{model}~{rid}", f"{type(err).__name__}: {err}")
                progress.advance(failed=True)
                return
        store.write({"id": f"{model}~{rid}", "model": model, "prompt_id": rid, "score": score})
        progress.advance()

    with progress:
        await asyncio.gather(*(one(m, rid) for m, rid in todo))
    scores: dict[str, list] = {m: [] for m in answers}
    for row in store.iter_rows():
        scores.setdefault(row["model"], []).append(row["score"])
    summary = grading_summary(scores, {m: sum(k.startswith(f"{m}~") for k in store.failed) for m in answers})
    store.write_manifest(complete=not store.failed)
    atomic_write_json(out_dir / "grades.json", summary)
    return summary


def write_winrates(out_dir: Path, winrates: list[dict]) -> Path:
    path = out_dir / "winrates.json"
    atomic_write_json(path, winrates)
    return path


def answers_from_samples(path: Path) -> dict[str, tuple[list[dict], str]]:
    """The first sample of each row of a `moaa sample` output file."""
    out = {}
    for row in read_rows(path):
        texts = sample_texts(row)
        if texts:
            out[row["id"]] = (sample_prompt(row), texts[0])
    return out


def all_answers_from_samples(path: Path) -> dict[str, tuple[list[dict], str]]:
    """Every sample of each row, keyed "<id>#<j>": sample j of one model is judged against sample j of another."""
    out = {}
    for row in read_rows(path):
        for j, text in enumerate(sample_texts(row)):
            out[f"{row['id']}#{j}"] = (sample_prompt(row), text)  # sample_prompt_id reads this key back
    return out


async def evaluate(args) -> dict:
    """`moaa eval`: the model's answers against a baseline's (or references), judged in both orders."""
    from moaa.client.endpoint import Endpoint

    from .judges import AnnotatorPairJudge, ChatPairJudge

    out = make_folder(args.out)
    base_ans = load_answers(args.baseline)
    if getattr(args, "contestant", None):  # an OpenAI-compatible endpoint answers the baseline's prompts
        from .contestant import contestant_answers, parse_contestant

        contestant = parse_contestant(args.contestant)
        args.name = contestant.name
        model_ans = await contestant_answers(contestant, base_ans, out, api_key_env=args.contestant_api_key_env,
                                             max_tokens=args.contestant_max_tokens, quiet=args.quiet)
    else:
        model_ans = load_answers(args.answers)
    pool = None
    if args.judge_url:
        from moaa.services.backend import BackendPool
        from moaa.services.config import parse_backend

        cfg = parse_backend({"urls": [args.judge_url], "served_model": args.judge_model,
                             "api_key_env": args.judge_api_key_env}, "bad judge settings")
        pool = BackendPool({args.judge_model: cfg}, probes=False)  # named by its model: the judge's identity
        await pool.start()
        judge = ChatPairJudge(pool, args.judge_model)
    else:
        judge = AnnotatorPairJudge(Endpoint.reached_as(args.annotator, args), ensemble=args.ensemble)
    try:
        guard_comparison(out, judge.name, args.name, args.baseline_name, model_ans, base_ans)
        store = DatasetStore(out / "judgments", stage="eval", fmt="generations").open()
        missing = await judge_pairs(judge, args.name, args.baseline_name, model_ans, base_ans, store, quiet=args.quiet)
        grades = None
        if args.grade:
            grades = await grade_answers(judge, {args.name: model_ans, args.baseline_name: base_ans}, out,
                                         quiet=args.quiet)
    finally:
        await judge.close()
        if pool is not None:
            await pool.close()
    store.write_manifest(complete=not store.failed)
    failed_grades = sum(g["failed"] for g in (grades or {}).values())
    if store.failed or failed_grades:
        first = next(iter(store.failed.values()), "see grades/failures.jsonl")
        from moaa.errors import TransientError

        raise TransientError(f"{len(store.failed)} judgments failed" + (f", {failed_grades} gradings failed" if
                             failed_grades else "") + f" (first: {first}); re-run to retry them")
    winrates = winrates_from_store(store, [(args.name, args.baseline_name)], n_resamples=args.bootstrap,
                                   missing={(args.name, args.baseline_name): missing})
    # the folder's other comparisons keep their results (one --out may hold several: other --name/--baseline-name)
    others = [w for w in (read_json(out / "winrates.json") or []) if isinstance(w, dict)
              and (w.get("model"), w.get("baseline")) != (args.name, args.baseline_name)]
    write_winrates(out, others + winrates)
    return {"winrates": winrates, "grades": grades, "out": str(out), "abstained": len(store.skipped)}
