"""What the benchmarks share for their results: the plot (one panel per model and budget, each
method's runs as small markers and their mean as a large outlined one, the budget as a dashed
line) and ``--render``, which prints the tables and draws the plot of earlier JSON outputs."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

STYLE = {"evolution": ("o", "tab:blue"), "amc": ("^", "tab:purple"),
         "random": ("v", "tab:gray"), "uniform": ("s", "tab:orange"),
         "tp-global": ("D", "tab:green")}


def per_item_plot(path, series: dict[str, list[float]], *, hlines: dict[float, str | None],
                  xlabel: str, ylabel: str, title: str, from_zero: bool = False) -> str:
    """One marker per item (x: its index) for each of ``series`` (label -> values), dashed red
    lines at ``hlines`` (y -> legend label, or None for none), written as a PNG to ``path``;
    returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (label, ys), marker in zip(series.items(), "os^v", strict=False):
        ax.plot(range(len(ys)), ys, marker=marker, ls="", label=label)
    for y, label in hlines.items():
        ax.axhline(y, color="tab:red", ls="--", lw=1, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if from_zero:
        ax.set_ylim(0, None)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


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


def render(files: list[str], key: str, script: str, table, plot, plot_path: str | None) -> int:
    """``--render``: merge the ``key`` lists of the JSON outputs in ``files``, print
    ``table(rows)`` and write ``plot(rows, path)`` (default: beside the first file). A file
    that cannot be read or is not such an output: one line, exit 2."""
    rows = []
    for f in files:
        try:
            rows += json.loads(Path(f).read_text())[key]
        except OSError as e:
            print(f"{script}: error: --render {f}: cannot read it ({e.strerror}); pass a file "
                  "an earlier run printed", file=sys.stderr)
            return 2
        except (ValueError, KeyError, TypeError) as e:
            print(f"{script}: error: --render {f}: not this script's JSON output "
                  f"({type(e).__name__}: {e}); pass a file an earlier run printed",
                  file=sys.stderr)
            return 2
    print(table(rows))
    where = plot(rows, Path(plot_path or Path(files[0]).with_suffix(".png")))
    if where:
        print(f"plot: {where}")
    return 0
