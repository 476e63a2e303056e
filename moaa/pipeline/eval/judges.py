"""Pairwise and single-answer judges for `moaa eval`: the annotator's ensemble, or any OpenAI-compatible model.

Every pair is judged in both orders (the model's answer first, then second); `prefer` returns the
averaged preference for the model, and whether the two orders disagreed (a position-driven verdict).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from moaa.client.pairs import failed_judge_models, usage_record
from moaa.services.annotator.parsing import parse_verdict
from moaa.usage import add_usage, usage_tokens

from ..budget import TokenLedger
from .grading import grading_messages, pairwise_messages, parse_rating
from .winrate import VERDICT_VALUE


@dataclass
class PairVerdict:
    preference: float | None        # P(model beats baseline) in [0, 1]; None: the judge abstained
    orders: tuple                   # what each order said, for the record
    inconsistent: bool
    # tokens the verdict cost, per model, journaled with its judgment row (the ledger's source of truth)
    usage: dict = field(default_factory=dict)
    # orders asked that gave no readable verdict: a pair decided by one order has no position-bias control,
    # so it is counted and shown beside the win rate, not silently treated as a two-order verdict
    abstained_orders: int = 0
    # judge models whose backend failed while an ensemble decided without them (its min_judges allowed it)
    judge_failures: list = field(default_factory=list)
    empty: bool = False             # decided without the judge: an answer was empty
    same: bool = False              # decided without the judge: both answers the same text (a tie)


def _combine(first: float | None, second: float | None, orders: tuple, usage: dict, asked: int = 2) -> PairVerdict:
    vals = [v for v in (first, second) if v is not None]
    if not vals:
        return PairVerdict(None, orders, False, usage, asked)
    inconsistent = len(vals) == 2 and (first - 0.5) * (second - 0.5) < 0
    return PairVerdict(sum(vals) / len(vals), orders, inconsistent, usage, asked - len(vals))


class AnnotatorPairJudge:
    """Annotate calls with the candidates in both orders; the combined scores decide.

    `both_orders=False` makes one call: right for a pairwise ensemble, which asks both orders itself.
    """

    def __init__(self, endpoint, *, ensemble: str = "", mode: str = "", both_orders: bool = True):
        self.both_orders = both_orders
        from moaa.v1 import annotator_pb2_grpc

        self.endpoint, self.ensemble, self.mode = endpoint, ensemble, mode
        self.name = f"annotator:{ensemble or 'default'}"
        self._channel = endpoint.channel()
        self._stub = annotator_pb2_grpc.AnnotatorStub(self._channel)

    async def _one(self, prompt, cands, usage: dict, failed: list) -> tuple[float | None, str]:
        from moaa.client.annotate import annotate_once

        r = await annotate_once(self._stub, self.endpoint, prompt, cands, ensemble=self.ensemble, mode=self.mode, seed=0)
        usage_record(r.usage, into=usage)
        failed.extend(m for m in failed_judge_models(r) if m not in failed)
        scores = {c.candidate_id: c.score for c in r.combined}
        if "m" not in scores or "b" not in scores or math.isnan(scores["m"]) or math.isnan(scores["b"]):
            return None, r.skip_reason or "no combined scores"  # every judge abstained: no verdict
        if scores["m"] > scores["b"]:
            return 1.0, f"m {scores['m']:.2f} > b {scores['b']:.2f}"
        if scores["m"] < scores["b"]:
            return 0.0, f"m {scores['m']:.2f} < b {scores['b']:.2f}"
        return 0.5, f"tie {scores['m']:.2f}"

    async def prefer(self, prompt, model_text, base_text) -> PairVerdict:
        usage: dict = {}
        failed: list = []
        first, why1 = await self._one(prompt, [("m", model_text), ("b", base_text)], usage, failed)
        if not self.both_orders:
            v = _combine(first, None, (why1,), usage, asked=1)
        else:
            second, why2 = await self._one(prompt, [("b", base_text), ("m", model_text)], usage, failed)
            v = _combine(first, second, (why1, why2), usage)
        v.judge_failures = failed
        return v

    async def close(self) -> None:
        await self._channel.close()


class ChatPairJudge:
    """Any OpenAI-compatible model as judge, through moaa's backend client; "[[A]]/[[B]]/[[C]]" verdicts."""

    def __init__(self, pool, model: str, *, max_tokens: int = 256, ledger: TokenLedger | None = None):
        self.pool, self.model, self.max_tokens, self.ledger = pool, model, max_tokens, ledger
        self.name = f"judge:{model}"

    async def _ask(self, messages, usage: dict | None = None) -> str:
        """One call; its tokens go to `usage` (a verdict's, journaled with its row) or else to the ledger."""
        res = await self.pool.client(self.model).chat(messages, {"temperature": 0.0, "max_tokens": self.max_tokens})
        if usage is not None:
            add_usage(usage, self.model, *usage_tokens(res.usage))
        elif self.ledger is not None:
            self.ledger.add("eval", self.model, res.usage)
        return res.text

    async def _verdict(self, prompt, a: str, b: str, usage: dict) -> str | None:
        for _ in range(2):  # one retry for an unreadable answer, then an abstention
            v = parse_verdict(await self._ask(pairwise_messages(prompt, a, b), usage)).verdict
            if v is not None:
                return v
        return None

    async def prefer(self, prompt, model_text, base_text) -> PairVerdict:
        usage: dict = {}
        v1 = await self._verdict(prompt, model_text, base_text, usage)   # model shown as A
        v2 = await self._verdict(prompt, base_text, model_text, usage)   # model shown as B
        first = None if v1 is None else VERDICT_VALUE[v1]
        second = None if v2 is None else 1.0 - VERDICT_VALUE[v2]
        return _combine(first, second, (v1, v2), usage)

    async def grade(self, prompt, answer: str) -> float | None:
        for _ in range(2):
            r = parse_rating(await self._ask(grading_messages(prompt, answer)))
            if r is not None:
                return r
        return None

    async def close(self) -> None:
        return None
