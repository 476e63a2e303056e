"""Reading scores and verdicts out of judges' free text. Pure functions, no I/O.

A strict format is asked for (JSON ratings, `Score: N`, `[[A]]`), and the common deviations are still
read: code fences and prose around JSON, `Score: 8/10`, `8 out of 10`, `**8**`, `Answer 2: 7`,
`Verdict: B`, `Assistant A is better`. A score slightly outside the scale is clipped; a score far
outside it (e.g. 85 on 1..10 without a denominator) is rejected. Nothing readable -> an error string,
which the engine turns into one retry and then an abstention, never into a score.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

NUM = r"(-?\d+(?:\.\d+)?)"
_DENOM = r"\s*(?:/|out\s+of|of)\s*(\d+(?:\.\d+)?)"
_LABELLED = re.compile(rf"(?:score|rating|grade|overall)\**\s*[:=]?\s*\**\s*{NUM}\**(?:{_DENOM})?", re.I)
_FRACTION = re.compile(rf"{NUM}{_DENOM}", re.I)
_BOLD = re.compile(rf"\*\*\s*{NUM}\s*\**")
_LEADING = re.compile(rf"^\W*?{NUM}(?:{_DENOM})?(?!\s*[.)]\s+\w)", re.I)
_ANSWER_MARK = re.compile(r"(?:answer|candidate|response|assistant)\s*#?\s*\[?(\d+)\]?|\[\[(\d+)\]\]", re.I)


@dataclass
class ParsedScore:
    score: float | None
    reason: str = ""
    error: str | None = None


@dataclass
class ParsedRatings:
    """Ratings of several answers by one judge; answers are 1-based as shown to the judge."""

    scores: dict[int, float] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    criteria_names: list[str] = field(default_factory=list)
    criteria: dict[int, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    out_of_range: list[str] = field(default_factory=list)


@dataclass
class ParsedVerdict:
    verdict: str | None  # "A" | "B" | "tie" | None
    reason: str = ""
    error: str | None = None


def criterion_key(name: str) -> str:
    """One spelling per criterion so judges' criteria can be matched: lower case, single spaces."""
    return re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip(" .:*")


def normalise(value: float, denom: float | None, lo: float, hi: float) -> tuple[float | None, str | None]:
    """Map a read value onto [lo, hi]: rescale by an explicit denominator, clip small overshoots."""
    if denom is not None and denom > 0 and denom != hi:
        value = lo + (value / denom) * (hi - lo) if value <= denom else value
    tol = (hi - lo) / 9   # one point of the default 1..10 scale, the same share of any other scale
    if value < lo - tol or value > hi + tol:
        return None, f"score {value:g} is outside the scale {lo:g}..{hi:g}"
    return min(hi, max(lo, value)), None


def _read_number(text: str, lo: float, hi: float) -> tuple[float | None, str | None]:
    for m in (_LABELLED.search(text), _FRACTION.search(text), _BOLD.search(text), _LEADING.match(text)):
        if m:
            denom = float(m.group(2)) if m.re.groups >= 2 and m.group(2) else None
            return normalise(float(m.group(1)), denom, lo, hi)
    return None, "no score found"


def parse_single_score(text: str, lo: float, hi: float) -> ParsedScore:
    """One overall score, e.g. `Score: 7`, `7/10`, `**7**`, or a reply that starts with the number."""
    text = (text or "").strip()
    if not text:
        return ParsedScore(None, error="empty answer")
    data = _find_json(text)
    if isinstance(data, dict):
        value = _first_number(data, ("score", "rating", "overall"))
        if value is not None:
            score, err = normalise(*value, lo, hi)
            return ParsedScore(score, str(data.get("reason", "")), err)
    score, err = _read_number(text, lo, hi)
    return ParsedScore(score, _reason_after(text), err)


def _reason_after(text: str) -> str:
    m = re.search(r"(?:reason|because|rationale)\s*[:\-]?\s*(.+)", text, re.I)
    line = m.group(1) if m else text
    return line.strip().splitlines()[0][:300] if line.strip() else ""


def _strip_fences(text: str) -> str:
    return re.sub(r"```(?:json)?", "", text)


def _find_json(text: str):
    """The first JSON object or array embedded in the text (prose and code fences around it are fine)."""
    text = _strip_fences(text)
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                data, _ = decoder.raw_decode(text[i:])
            except ValueError:
                continue
            if isinstance(data, (dict, list)) and data:
                return data
    return None


def _as_number(value) -> tuple[float, float | None] | None:
    """(value, its denominator or None) of a JSON value: a number, or a string such as "8" or "80/100";
    `normalise` puts it on the ensemble's scale, as the text path does."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value), None
    if isinstance(value, str):
        m = re.match(rf"\s*{NUM}(?:{_DENOM})?", value)
        if m:
            return float(m.group(1)), float(m.group(2)) if m.group(2) else None
    return None


def _first_number(d: dict, keys: tuple[str, ...]) -> tuple[float, float | None] | None:
    for k in keys:
        for dk, dv in d.items():
            if str(dk).lower() == k:
                v = _as_number(dv)
                if v is not None:
                    return v
    return None


def _answer_index(entry: dict, fallback: int) -> int:
    for k in ("answer", "id", "candidate", "index", "response"):
        if k in entry:
            m = re.search(r"\d+", str(entry[k]))
            if m:
                return int(m.group())
    return fallback


def _ratings_from_json(data, n: int, lo: float, hi: float, out: ParsedRatings) -> None:
    entries: list[tuple[int, object]] = []
    if isinstance(data, dict):
        out.criteria_names = [str(c) for c in data.get("criteria", []) if isinstance(c, (str, int))]
        listed = next((data[k] for k in ("ratings", "scores", "answers", "results") if isinstance(data.get(k), list)), None)
        if listed is not None:
            entries = [(_answer_index(e, i + 1) if isinstance(e, dict) else i + 1, e) for i, e in enumerate(listed)]
        else:  # {"1": 8, "2": {"score": 3}} or {"Answer 1": 8}
            for k, v in data.items():
                m = re.search(r"\d+", str(k))
                if m and (isinstance(v, (int, float, dict)) or _as_number(v) is not None):
                    entries.append((int(m.group()), v))
    elif isinstance(data, list):
        entries = [(_answer_index(e, i + 1) if isinstance(e, dict) else i + 1, e) for i, e in enumerate(data)]
    for idx, entry in entries:
        if not 1 <= idx <= n:
            continue
        if isinstance(entry, dict):
            value = _first_number(entry, ("score", "overall", "rating", "final", "final_score"))
            crit = entry.get("criteria") if isinstance(entry.get("criteria"), dict) else {}
            ratings = {}
            for cname, cval in crit.items():
                v = _as_number(cval)
                if v is not None:
                    s, _ = normalise(*v, lo, hi)
                    if s is not None:
                        ratings[str(cname)] = s
            if ratings:
                out.criteria[idx] = ratings
            if value is None and ratings:
                value = sum(ratings.values()) / len(ratings), None
            reason = entry.get("reason") or entry.get("rationale") or entry.get("explanation") or ""
            out.reasons[idx] = str(reason)[:500]
        else:
            value = _as_number(entry)
        if value is None:
            continue
        score, err = normalise(*value, lo, hi)
        if score is None:
            out.out_of_range.append(f"answer {idx}: {err}")
        else:
            out.scores[idx] = score
    if not out.criteria_names:
        names = []
        for r in out.criteria.values():
            names += [c for c in r if c not in names]
        out.criteria_names = names


def _ratings_from_text(text: str, n: int, lo: float, hi: float, out: ParsedRatings) -> None:
    """`Answer 1: 8/10 - reason` style: the text after each answer mark up to the next one."""
    marks = [(m.start(), m.end(), int(m.group(1) or m.group(2))) for m in _ANSWER_MARK.finditer(text)]
    for i, (start, end, idx) in enumerate(marks):
        if not 1 <= idx <= n or idx in out.scores:
            continue
        stop = marks[i + 1][0] if i + 1 < len(marks) else len(text)
        segment = text[end:stop]
        score, err = _read_number(segment, lo, hi)
        if score is not None:
            out.scores[idx] = score
            out.reasons[idx] = segment.strip(" :*-\n")[:300]
        elif err and "outside" in err:
            out.out_of_range.append(f"answer {idx}: {err}")


def parse_ratings(text: str, n: int, lo: float, hi: float) -> ParsedRatings:
    """Scores (and criteria ratings where written) of n answers shown as 1..n. error is set unless all n were read."""
    out = ParsedRatings()
    text = (text or "").strip()
    if not text:
        out.error = "empty answer"
        return out
    data = _find_json(text)
    if data is not None:
        _ratings_from_json(data, n, lo, hi, out)
    if len(out.scores) < n:
        _ratings_from_text(text, n, lo, hi, out)
    if n == 1 and not out.scores:
        single = parse_single_score(text, lo, hi)
        if single.score is not None:
            out.scores[1] = single.score
    missing = [i for i in range(1, n + 1) if i not in out.scores]
    if missing:
        detail = "; ".join(out.out_of_range) if out.out_of_range else "no score found"
        out.error = f"no readable score for answer(s) {', '.join(map(str, missing))} ({detail})"
    return out


_VERDICT_STRICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.I)  # [[C]]: a tie, as `moaa eval` asks
_VERDICT_LABELLED = re.compile(
    r"(?:verdict|winner|better answer|final answer|choice|decision|preferred)\**\s*(?:is)?\s*[:=]?\s*\**\s*\[?\s*"
    r"(?:answer|assistant|response)?\s*(A|B|tie)\b", re.I)
_VERDICT_PHRASE = re.compile(r"(?:answer|assistant|response)\s+(A|B)\s+(?:is|was)\s+(?:clearly\s+)?(?:better|superior|more)", re.I)
_TIE_PHRASE = re.compile(r"\b(?:it'?s a tie|tie|equally good|equally bad|both (?:answers )?are equally)\b", re.I)


_ANSWER_IS = re.compile(r"\b[Aa]nswer\s+is:?\s*\[?\(?([AB])\)?\]?(?=[\s.,;!]|$)")
_WORD = re.compile(r"[^\W_]+", re.U)


def quoted_answer(text: str, answers: tuple[str, str], min_share: float = 0.6, min_lead: float = 0.3) -> str | None:
    """"A" or "B" when the reply clearly repeats one answer's words and not the other's. Small judges
    often answer "which is better?" by copying the better answer, under whichever label."""
    said = {w.lower() for w in _WORD.findall(text)}
    shares = []
    for ans in answers:
        words = {w.lower() for w in _WORD.findall(ans)}
        shares.append(len(words & said) / len(words) if words else 0.0)
    a, b = shares
    if a >= min_share and a - b >= min_lead:
        return "A"
    if b >= min_share and b - a >= min_lead:
        return "B"
    return None


def parse_verdict(text: str, answers: tuple[str, str] | None = None) -> ParsedVerdict:
    """`[[A]]`, `[[B]]` or `[[tie]]`/`[[C]]` (the last one wins), or the common ways of saying the same; with
    `answers` given, a reply that repeats one of them (and names no verdict) counts for that one."""
    text = (text or "").strip()
    if not text:
        return ParsedVerdict(None, error="empty answer")
    reason = text.splitlines()[0][:300]
    strict = _VERDICT_STRICT.findall(text)
    if strict:
        return ParsedVerdict(_norm_verdict(strict[-1]), reason)
    labelled = _VERDICT_LABELLED.findall(text)
    if labelled:
        return ParsedVerdict(_norm_verdict(labelled[-1]), reason)
    phrases = {v.upper() for v in _VERDICT_PHRASE.findall(text)}
    if len(phrases) == 1:
        return ParsedVerdict(phrases.pop(), reason)
    if answers is not None:
        quoted = quoted_answer(text, answers)
        if quoted:
            return ParsedVerdict(quoted, reason)
    bare = re.fullmatch(r"\W*\[?\s*(A|B)\s*\]?\W*", text, re.I)
    if bare:
        return ParsedVerdict(bare.group(1).upper(), reason)
    said = _ANSWER_IS.findall(text)
    if said:
        return ParsedVerdict(said[-1], reason)
    if not phrases and _TIE_PHRASE.search(text):
        return ParsedVerdict("tie", reason)
    return ParsedVerdict(None, error="no verdict found (expected [[A]], [[B]] or [[tie]])")


def _norm_verdict(v: str) -> str:
    return "tie" if v.lower() in ("tie", "c") else v.upper()
