"""Loss curve (and for DPO reward accuracy and margins) as PNG, from metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

from moaa.jsonl import read_rows


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of metrics.jsonl, the last one per step (a resumed run logs re-done steps again); a torn last
    line of a killed run is left out."""
    by_step: dict[int, dict] = {}
    for row in read_rows(path, key=None):
        if "step" in row:
            by_step.setdefault(row["step"], {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def plot_metrics(metrics_path: str | Path, out_png: str | Path, kind: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return None
    panels = [("loss", "training loss")]
    if kind == "dpo":
        panels += [("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
