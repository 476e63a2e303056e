"""One judge's calls for one prompt: pointwise (all answers at once or one per call) and pairwise.

Every call goes through the shared BackendPool client, so per-backend throttles and concurrency caps
apply as in the gateway. An unreadable answer is asked again once, with the unreadable reply shown
and the format restated; still unreadable -> abstention with the reason, never a score. A backend
that fails (connect, timeout, 5xx, circuit open) is not an abstention: the call is recorded in
`CallLog.failures` and the judge counts as failed for this prompt (the engine's quorum rule decides).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from itertools import combinations
from typing import Awaitable, Callable

from moaa.services.backend.errors import BackendError

from . import parsing, stats
from .combine import JudgeResult
from .templates import JudgeTemplate

RETRY_NUDGE = ("Your reply could not be read: {error}. Reply again, in exactly the format asked for above, "
               "with nothing else.")


@dataclass
class Candidate:
    id: str
    text: str
    model: str = ""


@dataclass
class CallLog:
    """What one judge spent: requests, token usage, backend failures."""

    requests: int = 0
    usage: dict[str, int] = field(default_factory=lambda: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    failures: list = field(default_factory=list)


@dataclass
class Reply:
    """A judge's reply; `cut` says it stopped at max_tokens and how to fix that, for the abstention reason if
    it cannot be read (an abstention still: a small model may ramble past any limit)."""

    text: str
    cut: str = ""


# (messages) -> Reply, or raises BackendError; supplied by the engine.
ChatFn = Callable[[list[dict]], Awaitable[Reply]]


def render_conversation(prompt: list[dict]) -> str:
    """The conversation as the judge sees it: the bare question for one user turn, labelled turns otherwise."""
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def render_answers(cands: list[Candidate], order: list[int]) -> str:
    return "\n\n".join(f"[Answer {p}]\n{cands[i].text}\n[End of answer {p}]" for p, i in enumerate(order, 1))


async def ask(chat: ChatFn, messages: list[dict], parse, log: CallLog):
    """Call, parse; on an unreadable reply ask once more. Returns (parsed, error or None).

    A backend failure (the client already retried) is recorded in `log.failures`; the caller's judge
    then counts as failed, not abstained, so its partial result is never used."""
    async def call(msgs: list[dict]) -> Reply | BackendError:
        log.requests += 1
        try:
            return await chat(msgs)
        except BackendError as err:
            log.failures.append(err)
            return err

    reply = await call(messages)
    if isinstance(reply, BackendError):
        return parse(""), f"backend failed: {reply.cause}: {reply.message}"
    parsed = parse(reply.text)
    if parsed.error is None:
        return parsed, None
    reply2 = await call([*messages, {"role": "assistant", "content": reply.text},
                         {"role": "user", "content": RETRY_NUDGE.format(error=parsed.error)}])
    if isinstance(reply2, BackendError):
        return parse(""), f"unreadable ({parsed.error}), and the retry failed: {reply2.cause}"
    parsed2 = parse(reply2.text)
    if parsed2.error is None:
        return parsed2, None
    cut = reply2.cut or reply.cut   # the verdict may have been cut off by the config's limit: say so, and the fix
    return _better(parsed, parsed2), f"unreadable after one retry: {parsed2.error}" + (f"; {cut}" if cut else "")


def _better(a, b):
    """Of two partial pointwise parses keep the one with more scores (verdicts/single scores: the last)."""
    if hasattr(a, "scores") and isinstance(a.scores, dict):
        return a if len(a.scores) > len(b.scores) else b
    return b


def _new_result(judge, tpl: JudgeTemplate, n: int, seed: int, order: list[int]) -> JudgeResult:
    positions = [0] * n
    for p, i in enumerate(order):
        positions[i] = p
    return JudgeResult(name=judge.name, model=judge.model, weight=judge.weight, scores=[None] * n,
                       criteria=[{} for _ in range(n)], rationales=[""] * n, abstain_reasons=[""] * n,
                       positions=positions, order=order, seed=seed, template=tpl.name, template_hash=tpl.sha256)


async def pointwise_all(judge, tpl, chat: ChatFn, prompt, cands, seed, lo, hi, log: CallLog,
                        extra: Callable[[list[int]], dict] | None = None) -> JudgeResult:
    """Every answer in one call, in this judge's permuted order; criteria ratings kept where written."""
    n = len(cands)
    order = stats.permutation(n, seed)
    res = _new_result(judge, tpl, n, seed, order)
    messages = tpl.render(instruction=render_conversation(prompt), candidates=render_answers(cands, order),
                          n=n, scale_min=f"{lo:g}", scale_max=f"{hi:g}", **(extra(order) if extra else {}))
    parsed, err = await ask(chat, messages, lambda t: parsing.parse_ratings(t, n, lo, hi), log)
    res.criteria_names = [parsing.criterion_key(c) for c in parsed.criteria_names]
    for p, i in enumerate(order, 1):
        if p in parsed.scores:
            res.scores[i] = parsed.scores[p]
            res.rationales[i] = parsed.reasons.get(p, "")
            res.criteria[i] = {parsing.criterion_key(k): v for k, v in parsed.criteria.get(p, {}).items()}
        else:
            res.abstain_reasons[i] = err or "no readable score"
    shown = [res.scores[i] for i in order]
    res.position_bias = stats.position_bias_pointwise(shown)
    return res


async def pointwise_single(judge, tpl, chat: ChatFn, prompt, cands, seed, lo, hi, log: CallLog) -> JudgeResult:
    """One call per answer (for small judges); the permutation only orders the calls."""
    n = len(cands)
    order = stats.permutation(n, seed)
    res = _new_result(judge, tpl, n, seed, order)
    question = render_conversation(prompt)

    async def one(i: int):
        messages = tpl.render(instruction=question, answer=cands[i].text, scale_min=f"{lo:g}", scale_max=f"{hi:g}")
        return await ask(chat, messages, lambda t: parsing.parse_single_score(t, lo, hi), log)

    results = await asyncio.gather(*(one(i) for i in order))
    for i, (parsed, err) in zip(order, results):
        if err is None and parsed.score is not None:
            res.scores[i], res.rationales[i] = parsed.score, parsed.reason
        else:
            res.abstain_reasons[i] = err or "no readable score"
    return res


async def pairwise(judge, tpl, chat: ChatFn, prompt, cands, seed, lo, hi, log: CallLog,
                   reference: Candidate | None = None) -> JudgeResult:
    """Every pair (or every answer against the reference) in both orders; score = win rate on the scale."""
    n = len(cands)
    order = stats.permutation(n, seed)
    res = _new_result(judge, tpl, n, seed, order)
    question = render_conversation(prompt)
    ref_index = n  # the reference takes the index after the candidates
    pool = [*cands, reference] if reference is not None else cands
    if reference is not None:
        pairs = [(i, ref_index) for i in order]
    else:
        pairs = [(order[a], order[b]) for a, b in combinations(range(n), 2)]

    async def verdict(x: int, y: int):
        messages = tpl.render(instruction=question, answer_a=pool[x].text, answer_b=pool[y].text)
        answers = (pool[x].text, pool[y].text)
        return await ask(chat, messages, lambda t: parsing.parse_verdict(t, answers), log)

    calls = [(x, y) for x, y in pairs] + [(y, x) for x, y in pairs]
    results = await asyncio.gather(*(verdict(x, y) for x, y in calls))
    wins = [0.0] * n
    games = [0] * n
    shown: list[str | None] = []
    by_pair: dict[tuple[int, int], list[str | None]] = {}
    errors: list[str] = []
    for (x, y), (parsed, err) in zip(calls, results):
        v = parsed.verdict if err is None else None
        if err:
            errors.append(err)
        shown.append(v)
        key = (min(x, y), max(x, y))
        by_pair.setdefault(key, [None, None])[0 if x == key[0] else 1] = v
        if v is None:
            continue
        credit = {"A": (1.0, 0.0), "B": (0.0, 1.0), "tie": (0.5, 0.5)}[v]
        for idx, c in ((x, credit[0]), (y, credit[1])):
            if idx < n:
                wins[idx] += c
                games[idx] += 1
    for i in range(n):
        if games[i]:
            res.scores[i] = lo + (wins[i] / games[i]) * (hi - lo)
            res.rationales[i] = f"won {wins[i]:g} of {games[i]} comparisons"
        else:
            res.abstain_reasons[i] = errors[0] if errors else "no readable verdict"
    res.position_bias = stats.position_bias_pairwise(shown)
    res.order_flip_rate = stats.order_flip_rate([tuple(v) for v in by_pair.values()])
    return res
