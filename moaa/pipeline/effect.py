"""Did training change the model? Judge-independent measures of each stage's effect (no torch here).

    sft_heldout_loss     mean per-token loss (negative log-likelihood, pooled over tokens) of the base and
                         the SFT model on held-out stage-1 MoA answers (the eval prompts' rows, never trained on)
    dpo_reward_accuracy  on held-out preference pairs (and, beside it, the training pairs): the share where the
                         DPO implicit reward r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) ranks chosen over
                         rejected (ties count half), with a percentile-bootstrap 95% CI over pairs. The DPO
                         model's reference is the SFT model; the SFT model's reference is itself, so every
                         margin is 0 and its accuracy is 0.5 by definition
    dpo_reward_margin    mean r(chosen) - r(rejected) on the same pairs
    answers_changed      share of eval prompts whose greedy answer differs: SFT vs base, DPO vs SFT; and under
                         "sampled", the share of sampled answers that differ (sample j of each model is drawn
                         from the same seed, so a small change of the model shows there before it moves the
                         greedy answer)

The log-probabilities come from `moaa logprobs` (trainer/effect.py), run as a child process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moaa.jsonl import read_rows as iter_jsonl

from .eval.winrate import bootstrap_ci, claim, sign_test

NOTE_SFT_REFERENCE = ("SFT model: its reference is itself, so every reward margin is 0 and its accuracy is 0.5 by "
                      "definition (ties count half)")


def _split_conversation(messages: list[dict]) -> tuple[list[dict], list[dict]] | None:
    """An SFT row -> (prompt up to the last user turn, the assistant turn(s) after it)."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    if last_user < 0 or last_user == len(messages) - 1:
        return None
    return messages[:last_user + 1], messages[last_user + 1:]


def effect_items(sft_heldout: Path, pairs_files: dict[str, Path]) -> list[dict]:
    """The rows `moaa logprobs` scores: held-out SFT answers (base and SFT model), both sides of each
    pair (SFT and DPO model). Ids: "sft:<id>", "<split>:chosen:<id>", "<split>:rejected:<id>"."""
    items = []
    if sft_heldout.exists():
        for row in iter_jsonl(sft_heldout):
            parts = _split_conversation(row["messages"])
            if parts:
                items.append({"id": f"sft:{row['id']}", "prompt": parts[0], "completion": parts[1],
                              "models": ["base", "sft"]})
    for split, path in pairs_files.items():
        if not path.exists():
            continue
        for row in iter_jsonl(path):
            for side in ("chosen", "rejected"):
                items.append({"id": f"{split}:{side}:{row['id']}", "prompt": row["prompt"], "completion": row[side],
                              "models": ["sft", "dpo"]})
    return items


def _ci(values: np.ndarray, statistic) -> list[float]:
    return list(bootstrap_ci(len(values), lambda i: statistic(values[i])))


def _accuracy(margins: np.ndarray) -> float:
    return float(np.mean((margins > 0) + 0.5 * (margins == 0)))


def sft_loss(lp: dict[str, dict[str, list]]) -> dict[str, Any]:
    ids = [k for k in lp.get("base", {}) if k.startswith("sft:")]
    if not ids or "sft" not in lp:
        return {"note": "no held-out stage-1 answers"}
    out: dict[str, Any] = {"rows": len(ids), "tokens": int(sum(lp["base"][k][1] for k in ids))}
    for model in ("base", "sft"):
        out[model] = -sum(lp[model][k][0] for k in ids) / max(1, out["tokens"])
    out["change"] = out["sft"] - out["base"]
    return out


def reward_margins(lp: dict[str, dict[str, list]], split: str, beta: float) -> np.ndarray:
    """beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)] for the DPO model vs SFT."""
    dpo, sft = lp.get("dpo", {}), lp.get("sft", {})
    prefix = f"{split}:chosen:"
    ids = sorted(k[len(prefix):] for k in dpo if k.startswith(prefix))   # the interval must not follow file order
    out = []
    for rid in ids:
        c, r = f"{split}:chosen:{rid}", f"{split}:rejected:{rid}"
        out.append(beta * ((dpo[c][0] - sft[c][0]) - (dpo[r][0] - sft[r][0])))
    return np.asarray(out, dtype=float)


def dpo_rewards(lp: dict[str, dict[str, list]], beta: float) -> tuple[dict, dict]:
    acc: dict[str, Any] = {"beta": beta, "note": NOTE_SFT_REFERENCE}
    margin: dict[str, Any] = {"beta": beta}
    for split in ("heldout", "train"):
        m = reward_margins(lp, split, beta)
        if m.size == 0:
            acc[split] = margin[split] = {"n": 0}
            continue
        acc[split] = {"n": int(m.size), "sft": 0.5, "dpo": _accuracy(m), "dpo_ci": _ci(m, _accuracy),
                      "sign_test_p": sign_test((m > 0) + 0.5 * (m == 0))[2]}
        margin[split] = {"n": int(m.size), "sft": 0.0, "dpo": float(m.mean()),
                         "dpo_ci": _ci(m, lambda v: float(v.mean()))}
    return acc, margin


def answers_changed(answers: dict[str, dict[str, tuple]]) -> dict[str, dict]:
    """Per stage, how many eval prompts got a different (greedy) answer than from the model before it."""
    out = {}
    for name, (after, before) in {"sft_vs_base": ("sft", "base"), "dpo_vs_sft": ("dpo", "sft")}.items():
        a, b = answers.get(after) or {}, answers.get(before) or {}
        common = [rid for rid in a if rid in b]
        changed = sum(a[rid][1].strip() != b[rid][1].strip() for rid in common)
        out[name] = {"n": len(common), "changed": changed, "share": changed / len(common) if common else None}
    return out


def statements(effect: dict[str, Any]) -> list[str]:
    """Plain sentences: what each stage changed, and when it changed nothing a user would see."""
    out = []
    loss = effect.get("sft_heldout_loss") or {}
    changed = effect.get("answers_changed") or {}
    if "sft" in loss:
        verb = "lowered" if loss["change"] < 0 else "did not lower"
        out.append(f"SFT {verb} the per-token loss on {loss['rows']} held-out MoA answers: "
                   f"{loss['base']:.3f} (base) -> {loss['sft']:.3f} (SFT).")
    held = (effect.get("dpo_reward_accuracy") or {}).get("heldout") or {}
    if held.get("n"):
        lo, hi = held["dpo_ci"]
        sign_p = held.get("sign_test_p")
        said = claim((lo, hi), held["n"], even=0.5, sign_p=sign_p)   # the win rates' rule, in its words
        tail = {"too_few": "too few held-out pairs for an interval to mean much",
                "includes": "the interval includes 0.5: too few pairs to tell DPO from no change",
                "better": "above 0.5", "worse": "below 0.5"}.get(said) or (
            f"the interval excludes 0.5 but the sign test gives p = {sign_p:.2g}: too few pairs to tell DPO "
            "from no change")
        train = (effect.get("dpo_reward_accuracy") or {}).get("train") or {}
        beside = f"; on its {train['n']} training pairs {train['dpo']:.0%}" if train.get("n") else ""
        out.append(f"DPO's implicit reward ranks chosen over rejected on {held['dpo']:.0%} of {held['n']} held-out "
                   f"pairs (95% CI {lo:.0%}-{hi:.0%}; the SFT model's 50% by definition): {tail}{beside}.")
    for key, stage, before in (("sft_vs_base", "SFT", "the base model"), ("dpo_vs_sft", "DPO", "the SFT model")):
        c = changed.get(key) or {}
        sampled = (changed.get("sampled") or {}).get(key) or {}
        if not c.get("n"):
            continue
        if c["changed"] == 0 and sampled.get("changed"):
            out.append(f"{stage} left every greedy answer as {before}'s ({c['n']} eval prompts), but changed "
                       f"{sampled['changed']} of {sampled['n']} sampled answers drawn with the same seeds.")
        elif c["changed"] == 0:
            out.append(f"{stage} changed nothing a user would see: its greedy answers equal {before}'s on all "
                       f"{c['n']} eval prompts" + (f", and all {sampled['n']} sampled answers too" if sampled.get("n")
                                                   else "") + ".")
        else:
            out.append(f"{stage} changed the greedy answer on {c['changed']} of {c['n']} eval prompts "
                       f"({c['share']:.0%}) against {before}.")
    return out


def training_effect(lp: dict[str, dict[str, list]], answers: dict[str, dict[str, tuple]], beta: float,
                    sampled: dict[str, dict[str, tuple]] | None = None) -> dict:
    """`answers`: per model, eval prompt id -> (prompt, greedy answer); `sampled`: the same keyed "<id>#<j>"."""
    acc, margin = dpo_rewards(lp, beta)
    changed = answers_changed(answers)
    if sampled:
        changed["sampled"] = answers_changed(sampled)
    effect = {"sft_heldout_loss": sft_loss(lp), "dpo_reward_accuracy": acc, "dpo_reward_margin": margin,
              "answers_changed": changed}
    effect["statements"] = statements(effect)
    return effect
