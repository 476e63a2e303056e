"""The run report: one Markdown page with PNG plots, built only from what the run folder holds.

Sections: stages and rows (written, skipped and why, failed), tokens per stage and model, training
losses (SFT, DPO), judge score distributions and agreement (from the preference pairs), win rates with
confidence intervals (raw and length-controlled) and 1-10 grades (from `eval/`), and the judge-independent
training effect (`eval/effect.json`: held-out loss, DPO implicit-reward accuracy, answers changed).
"""
from __future__ import annotations

from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np

from moaa.client.pairs import judge_scores as row_judge_scores
from moaa.files import read_json, rejected_note
from moaa.jsonl import read_rows
from moaa.services.annotator.stats import kendall_tau
from moaa.trainer.plots import read_metrics

from .layout import RunLayout


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _plt().close(fig)


def _metrics(model_dir: Path) -> list[dict]:
    return [r for r in read_metrics(model_dir / "metrics.jsonl") if isinstance(r.get("loss"), (int, float))]


def plot_losses(layout: RunLayout, out: Path) -> tuple[Path | None, dict[str, dict]]:
    """SFT and DPO loss curves side by side; returns (png, {kind: {first, last, steps}})."""
    curves = {k: _metrics(d) for k, d in (("SFT", layout.sft_model), ("DPO", layout.dpo_model))}
    curves = {k: v for k, v in curves.items() if v}
    summary = {k: {"first": v[0]["loss"], "last": v[-1]["loss"], "steps": v[-1]["step"]} for k, v in curves.items()}
    if not curves:
        return None, summary
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], curves.items()):
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 30 else None)
        ax.set_title(f"{kind} training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean per-token, nats)" if kind == "SFT" else "DPO loss (nats)")
        ax.grid(alpha=0.3)
    _save(fig, out)
    return out, summary


class JudgeTally:
    """The judges' score counts and pairwise Kendall tau sums, gathered one pair row at a time: the
    report's memory does not grow with the number of pairs."""

    def __init__(self) -> None:
        self.scores: dict[str, Counter] = {}                      # judge -> score -> candidates
        self.taus: dict[tuple[str, str], list[float]] = {}       # (a, b), a < b -> [sum, prompts]

    def add(self, per_judge: dict[str, list[float | None]]) -> None:
        """One prompt: judge -> its scores of the candidates, in candidate order (None: abstained)."""
        for judge, scores in per_judge.items():
            self.scores.setdefault(judge, Counter()).update(float(v) for v in scores if v is not None)
        for a, b in combinations(sorted(per_judge), 2):
            acc = self.taus.setdefault((a, b), [0.0, 0])
            # the annotator's own tau: None where fewer than two common scores or one side is constant
            if (t := kendall_tau(per_judge[a], per_judge[b])) is not None:
                acc[0] += t
                acc[1] += 1

    @classmethod
    def of_pairs(cls, pairs_dir: Path) -> "JudgeTally":
        tally = cls()
        for shard in sorted(pairs_dir.glob("data-*.jsonl")):
            for row in read_rows(shard):
                tally.add(row_judge_scores(row))
        return tally


def judge_agreement(tally: JudgeTally) -> tuple[list[str], np.ndarray]:
    """Mean Kendall tau per pair of judges over the prompts both scored (NaN where undefined)."""
    names = sorted(tally.scores)
    mat = np.eye(len(names))
    for (i, a), (j, b) in combinations(enumerate(names), 2):
        total, n = tally.taus.get((a, b), (0.0, 0))
        mat[i, j] = mat[j, i] = total / n if n else np.nan
    return names, mat


def plot_judges(tally: JudgeTally, out_scores: Path, out_agree: Path) -> tuple[Path | None, Path | None]:
    if not tally.scores:
        return None, None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for judge, counts in sorted(tally.scores.items()):
        if counts:
            ax.hist(list(counts), weights=list(counts.values()), bins=np.arange(0.5, 11.5, 1.0), alpha=0.5,
                    label=judge)
    ax.set_title("judge score distributions")
    ax.set_xlabel("judge score (1-10 scale)")
    ax.set_ylabel("candidates")
    ax.legend(fontsize=8)
    _save(fig, out_scores)
    agree_png = None
    if len(tally.scores) >= 2:
        names, mat = judge_agreement(tally)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.5))
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("judge")
        ax.set_ylabel("judge")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, "-" if np.isnan(mat[i, j]) else f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title("judge agreement (mean Kendall tau)")
        fig.colorbar(im, ax=ax)
        _save(fig, out_agree)
        agree_png = out_agree
    return out_scores, agree_png


def plot_winrates(winrates: list[dict], out: Path) -> Path | None:
    winrates = [w for w in winrates if w.get("win_rate") is not None]  # a pair with no verdict has no bar
    if not winrates:
        return None
    plt = _plt()
    labels = [f"{w['model']}\nvs {w['baseline']}" for w in winrates]
    x = np.arange(len(winrates))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(winrates)), 3.8))
    for off, key, name in ((-0.18, "win_rate", "win rate"), (0.18, "lc_win_rate", "length-controlled")):
        vals = np.array([w[key] for w in winrates])
        ci = np.array([w[f"{key}_ci"] for w in winrates])
        err = np.vstack([np.clip(vals - ci[:, 0], 0, None), np.clip(ci[:, 1] - vals, 0, None)])
        ax.bar(x + off, vals, width=0.36, yerr=err, capsize=4, label=name)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("model vs baseline")
    ax.set_ylim(0, 100)
    ax.set_ylabel("win rate against the baseline, %\n(bars: 95% bootstrap CI)")
    ax.set_title("pairwise win rates")
    ax.legend(fontsize=8)
    _save(fig, out)
    return out


def plot_effect(effect: dict, out: Path) -> Path | None:
    """Three panels: held-out loss (base, SFT), DPO reward accuracy with CI (held-out, train), answers changed."""
    loss = effect.get("sft_heldout_loss") or {}
    acc = effect.get("dpo_reward_accuracy") or {}
    changed = effect.get("answers_changed") or {}
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    if "sft" in loss:
        axes[0].bar(["base", "SFT"], [loss["base"], loss["sft"]], color=["grey", "tab:blue"])
    axes[0].set_title(f"loss on {loss.get('rows', 0)} held-out MoA answers")
    axes[0].set_ylabel("mean per-token loss (nats)")
    axes[0].set_xlabel("model")
    splits = [k for k in ("heldout", "train") if (acc.get(k) or {}).get("n")]
    for i, split in enumerate(splits):
        a = acc[split]
        err = [[max(0.0, a["dpo"] - a["dpo_ci"][0])], [max(0.0, a["dpo_ci"][1] - a["dpo"])]]
        axes[1].bar(i - 0.2, a["sft"], width=0.4, color="grey", label="SFT (ref = itself)" if i == 0 else None)
        axes[1].bar(i + 0.2, a["dpo"], width=0.4, yerr=err, capsize=4, color="tab:orange",
                    label="DPO (ref = SFT)" if i == 0 else None)
    axes[1].set_xticks(range(len(splits)), [f"{s} (n={acc[s]['n']})" for s in splits])
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("DPO implicit-reward accuracy (95% CI)")
    axes[1].set_ylabel("share of pairs, chosen ranked first")
    axes[1].set_xlabel("preference pairs")
    if splits:
        axes[1].legend(fontsize=8)
    names = [k for k in ("sft_vs_base", "dpo_vs_sft") if (changed.get(k) or {}).get("n")]
    sampled = changed.get("sampled") or {}
    x = np.arange(len(names))
    axes[2].bar(x - 0.2, [changed[k]["share"] for k in names], width=0.4, color="tab:green", label="greedy")
    axes[2].bar(x + 0.2, [(sampled.get(k) or {}).get("share") or 0.0 for k in names], width=0.4, color="tab:olive",
                label="sampled (same seeds)")
    axes[2].set_xticks(x, [k.replace("_", " ") for k in names])
    axes[2].set_ylim(0, 1)
    axes[2].set_title("share of eval answers that differ")
    axes[2].set_ylabel("share of answers")
    axes[2].set_xlabel("stage against the model before it")
    if names:
        axes[2].legend(fontsize=8)
    _save(fig, out)
    return out


def effect_section(effect: dict | None, out: Path) -> list[str]:
    if not effect:
        return []
    lines = ["## Did training change the model?", "",
             "Judge-independent: computed from the models' own log-probabilities and answers, no judge involved.", ""]
    lines += [f"- {s}" for s in effect.get("statements") or []] + [""]
    loss = effect.get("sft_heldout_loss") or {}
    if "sft" in loss:
        lines += [f"Held-out loss ({loss['rows']} stage-1 MoA answers to the eval prompts, {loss['tokens']} tokens): "
                  f"base {loss['base']:.4f}, SFT {loss['sft']:.4f} ({loss['change']:+.4f}).", ""]
    acc, margin = effect.get("dpo_reward_accuracy") or {}, effect.get("dpo_reward_margin") or {}
    rows = [(k, acc[k], margin[k]) for k in ("heldout", "train") if (acc.get(k) or {}).get("n")]
    if rows:
        lines += [f"DPO implicit reward, beta = {acc.get('beta')}; {acc.get('note', '')}.", "",
                  "| pairs | n | accuracy SFT | accuracy DPO (95% CI) | mean margin DPO (95% CI) |", "|---|---|---|---|---|"]
        for split, a, m in rows:
            lines.append(f"| {split} | {a['n']} | {a['sft']:.2f} | {a['dpo']:.2f} [{a['dpo_ci'][0]:.2f}, "
                         f"{a['dpo_ci'][1]:.2f}] | {m['dpo']:.4f} [{m['dpo_ci'][0]:.4f}, {m['dpo_ci'][1]:.4f}] |")
        lines.append("")
    png = plot_effect(effect, out / "training_effect.png")
    return lines + [f"![training effect]({png.name})", ""]


def stage_section(stages: dict) -> list[str]:
    """Every stage of the pipeline with its status; those not done are named, so the report of an
    interrupted run says what it is missing."""
    from .stages import STAGES

    lines = ["| stage | status | seconds |", "|---|---|---|"]
    for name in [n for n, _ in STAGES] + [n for n in stages if n not in dict(STAGES)]:
        st = stages.get(name) or {}
        status = st.get("status", "not run")
        if st.get("error") and status != "done":
            status += f": {str(st['error']).splitlines()[0][:120].replace('|', '/')}"
        lines.append(f"| {name} | {status} | {st.get('seconds', 0):.0f} |")
    unfinished = [n for n, _ in STAGES if (stages.get(n) or {}).get("status") != "done"]
    if unfinished:
        lines += ["", f"**Incomplete run**: not done: {', '.join(unfinished)}. The sections below show only what "
                  "the finished stages wrote; re-run `moaa pipeline run` with the same options to finish."]
    return lines + [""]


def _cell(value: float | None, ci) -> str:
    return "-" if value is None else f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def eval_section(winrates: list[dict], run: dict, out: Path) -> list[str]:
    """Win rates with what their intervals support, and every pair the judge could not decide, counted."""
    note = ((run.get("stages") or {}).get("eval", {}).get("result") or {}).get("note")
    if not winrates:
        return ["## Evaluation", "", f"No win rates: {note}.", ""] if note else []
    lines = ["## Evaluation", "", "Each pair judged in both orders; ties and order-dependent verdicts count half. "
             "LC = AlpacaEval 2 length-controlled win rate. Result: \"better\" or \"worse\" only where the whole "
             "95% interval lies on one side of 50%; an interval that includes 50% is \"no measurable difference\". "
             "Abstained (no readable verdict in either order), failed (judge errors, retried by a re-run) and "
             "missing (no answer from one side) pairs are not in n and are never counted as ties; \"+k in one order\": "
             "k pairs in n decided by one order, the judge unreadable in the other; n \"(k empty)\": k pairs decided without "
             "the judge because an answer was empty (it loses; both empty: a tie); \"(k without a failed judge)\": k "
             "verdicts an ensemble gave without a judge whose backend failed. A result also needs the exact sign test "
             "over the decided prompts below 5% (at a few prompts the interval alone is too narrow). `:sampled` rows: "
             "k answers per prompt at a temperature > 0 (fixed seeds), sample j of the model against sample j of "
             "the baseline; n counts samples, the intervals resample prompts.", "",
             "| model | baseline | n | prompts | win rate (95% CI) | LC win rate (95% CI) | result | LC result | W/T/L "
             "| order-inconsistent | abstained | failed | missing |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in winrates:
        n_cell = f"{w['n']}" + (f" ({w['empty']} empty)" if w.get("empty") else "") + (
            f" ({w['same']} the same answer)" if w.get("same") else "") + (
            f" ({w['fewer_judges']} without a failed judge)" if w.get("fewer_judges") else "")
        lines.append(f"| {w['model']} | {w['baseline']} | {n_cell} | {w.get('prompts', w['n'])} | "
                     f"{_cell(w['win_rate'], w['win_rate_ci'])} | {_cell(w['lc_win_rate'], w['lc_win_rate_ci'])} | "
                     f"{w.get('conclusion') or '-'} | {w.get('lc_conclusion') or '-'} | "
                     f"{w['wins']:.0f}/{w['ties']:.0f}/{w['losses']:.0f} | {w.get('inconsistent', 0)} | "
                     f"{w.get('abstained', 0)}" + (f" (+{w['one_order']} in one order)" if w.get("one_order") else "")
                     + f" | {w.get('failed', 0)} | {w.get('missing', 0)} |")
    wr_png = plot_winrates(winrates, out / "winrates.png")
    return lines + (["", f"![win rates]({wr_png.name})", ""] if wr_png else [""])


def no_pair_section(pairs_dir: Path) -> list[str]:
    """Why prompts gave no pair: counts per reason kind, with one full reason as an example."""
    path = pairs_dir / "skipped.jsonl"
    kinds: dict[str, list[str]] = {}
    for row in read_rows(path):
        kinds.setdefault(str(row.get("reason", "")).split(":")[0], []).append(str(row.get("reason", "")))
    if not kinds:
        return []
    lines = ["### Prompts that gave no preference pair", "", "| reason | prompts | example |", "|---|---|---|"]
    for kind, reasons in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| {kind} | {len(reasons)} | {reasons[0][:160].replace('|', '/')} |")
    return lines + [""]


def _dataset_line(name: str, folder: Path) -> str | None:
    m = read_json(folder / "manifest.json")
    if not m:
        return None
    reasons = ", ".join(f"{k}: {v}" for k, v in (m.get("skipped_reasons") or {}).items())
    return (f"| {name} | {m.get('rows', 0)} | {m.get('skipped', 0)}{f' ({reasons})' if reasons else ''} "
            f"| {m.get('failed', 0)} | {'yes' if m.get('complete') else 'no'} | {', '.join(m.get('models', []))} |")


def rejected_lines(layout: RunLayout) -> list[str]:
    """Rows a server refused as bad input (e.g. a prompt past the model's context): which file lists them."""
    from .store import REJECTED

    lines = []
    for name, folder in (("stage 1", layout.sft_data), ("stage 2", layout.pairs)):
        m = read_json(folder / "manifest.json") or {}
        note = rejected_note({**m, "rejected_file": str(folder / REJECTED)})
        if note:
            lines.append(f"- {name}: {note[2:]}")
    return lines + [""] if lines else []


def build_report(run_dir: str | Path) -> Path:
    """Write `report/report.md` and its PNGs from a run folder; returns the Markdown path."""
    layout = RunLayout(Path(run_dir))
    out = layout.report
    out.mkdir(parents=True, exist_ok=True)
    run = read_json(layout.run_manifest) or {}
    lines = ["# moaa pipeline report", ""]
    if run:
        lines += [f"Run folder `{layout.root}`; config hash `{run.get('config_hash', '-')}`; "
                  f"started {run.get('started_at', '-')}, updated {run.get('updated_at', '-')}.", ""]
        lines += stage_section(run.get("stages", {}))
    rows = [r for r in (_dataset_line("stage 1: MoA SFT data", layout.sft_data),
                        _dataset_line("stage 2: samples", layout.samples),
                        _dataset_line("stage 2: preference pairs", layout.pairs),
                        _dataset_line("eval: pairwise judgments", layout.eval / "judgments")) if r]
    if rows:
        lines += ["## Datasets", "", "| dataset | rows | skipped (why) | failed | complete | models |",
                  "|---|---|---|---|---|---|", *rows, ""]
        lines += rejected_lines(layout)
        lines += no_pair_section(layout.pairs)
    usage = read_json(layout.usage)
    if usage and usage.get("stages"):
        lines += ["## Tokens", "", f"Total: {usage['total_tokens']} tokens"
                  + (f" (budget {usage['budget']})" if usage.get("budget") else "") + ".", "",
                  "| stage | model | prompt | completion | requests |", "|---|---|---|---|---|"]
        for stage, models in usage["stages"].items():
            for model, rec in models.items():
                lines.append(f"| {stage} | {model} | {rec['prompt_tokens']} | {rec['completion_tokens']} | {rec['requests']} |")
        lines.append("")
    loss_png, losses = plot_losses(layout, out / "losses.png")
    if losses:
        lines += ["## Training", ""]
        for kind, s in losses.items():
            lines.append(f"- {kind}: loss {s['first']:.4f} -> {s['last']:.4f} over {s['steps']} steps")
        lines += ["", f"![training losses]({loss_png.name})", ""]
    lines += effect_section(read_json(layout.eval / "effect.json"), out)
    scores_png, agree_png = plot_judges(JudgeTally.of_pairs(layout.pairs), out / "judge_scores.png",
                                        out / "judge_agreement.png")
    if scores_png:
        lines += ["## Judges", "", f"![judge score distributions]({scores_png.name})", ""]
        if agree_png:
            lines += [f"![judge agreement]({agree_png.name})", ""]
    lines += eval_section(read_json(layout.eval / "winrates.json") or [], run, out)
    grades = read_json(layout.eval / "grades.json")
    note = (((read_json(layout.run_manifest) or {}).get("stages") or {}).get("eval", {}).get("result") or {}).get("grades_note")
    if note and not grades:
        lines += [f"Single-answer grades: {note}.", ""]
    if grades:
        lines += ["Single-answer grades (1-10, MT-Bench style):", "", "| model | mean | graded | abstained | failed |",
                  "|---|---|---|---|---|"]
        for model, g in grades.items():
            mean = "-" if g.get("mean") is None else f"{g['mean']:.2f}"
            lines.append(f"| {model} | {mean} | {g['n']} | {g['abstained']} | {g.get('failed', 0)} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
