"""The benchmarks' plot: one panel per model and budget, each method's runs as small markers and
their mean as a large outlined one, the budget as a dashed line."""

from __future__ import annotations

import statistics
from pathlib import Path

STYLE = {"evolution": ("o", "tab:blue"), "amc": ("^", "tab:purple"),
         "random": ("v", "tab:gray"), "uniform": ("s", "tab:orange"),
         "tp-global": ("D", "tab:green")}


def panels(groups, path: Path, *, xlabel: str, ylabel: str) -> Path | None:
    """``groups``: ``[(title, budget, {method: [(x, y), ...]})]``; nothing drawn without
    points. Writes a PNG to ``path`` and returns it."""
    groups = [g for g in groups if any(g[2].values())]
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), dpi=120,
                             squeeze=False)
    for ax, (title, budget, by) in zip(axes[0], groups, strict=True):
        for method, points in by.items():
            if not points:
                continue
            m, color = STYLE.get(method, ("x", "0.3"))
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, marker=m, color=color, s=28, alpha=0.6)
            ax.scatter([statistics.mean(xs)], [statistics.mean(ys)], marker=m, color=color,
                       s=110, edgecolor="k", label=f"{method} (mean of {len(xs)})", zorder=3)
        ax.axvline(budget, color="tab:red", ls="--", lw=1, label="budget")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
