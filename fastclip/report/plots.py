"""The report's pictures: the metric against the cost with the Pareto frontier marked (pareto.png),
and the training curves (curves.png). matplotlib, drawn off-screen (Agg)."""
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from fastclip.eval.names import lower_is_better  # noqa: E402
from fastclip.report.table import Group  # noqa: E402



def pareto_frontier(points: list[tuple[float, float]], lower_better: bool = False) -> list[int]:
    """Indices of the points (cost, value) that no other point dominates: none costs no more and is
    no worse, being strictly better in one. Sorted by cost."""
    sign = -1 if lower_better else 1

    def dominates(a, b):
        return a[0] <= b[0] and sign * a[1] >= sign * b[1] and (a[0] < b[0] or sign * a[1] > sign * b[1])
    keep = [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]
    return sorted(keep, key=lambda i: points[i])


def pareto_plot(groups: list[Group], metric: str, cost: str, path: Path, title: str,
                chance: float | None = None) -> list[Group]:
    """Each group at (mean cost, mean metric) with std error bars, labelled by its choices; the
    frontier's points in red, joined by a staircase. A lower cost is better. chance: what guessing
    scores on the metric (eval.names.chance_level), drawn as a dashed line. The legend sits outside the
    axes, never over a point. Returns the frontier's groups (cheapest first); groups that did not log
    both metrics are left out (and named in the picture's footnote)."""
    placed = [(g, g.stat(cost), g.stat(metric)) for g in groups]
    missing = [g.label for g, c, m in placed if c is None or m is None]
    placed = [(g, c, m) for g, c, m in placed if c is not None and m is not None]
    lower = lower_is_better(metric)
    front = pareto_frontier([(c[0], m[0]) for _, c, m in placed], lower)
    fig, ax = plt.subplots(figsize=(7, 5.2), layout="constrained")
    for i, (g, c, m) in enumerate(placed):
        on = i in front
        ax.errorbar(c[0], m[0], xerr=c[1] or 0, yerr=m[1] or 0, fmt="o", capsize=3,
                    color="C3" if on else "C0", mfc="C3" if on else "white", ms=7)
        ax.annotate(f"{g.label} (n={m[2]})", (c[0], m[0]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if front:
        xs, ys = zip(*[(placed[i][1][0], placed[i][2][0]) for i in front])
        ax.step(xs, ys, where="post", color="C3", lw=1, alpha=0.7)
        # the legend's entry looks like what is drawn: a lone optimum is a red point, not a line
        joined = len(front) > 1
        ax.plot([], [], marker="o", color="C3", ls="-" if joined else "none", lw=1,
                label="Pareto frontier" if joined else "Pareto-optimal (the only point on the frontier)")
    if chance is not None:
        ax.axhline(chance, color="0.4", ls="--", lw=1, label=f"chance ({chance:.3g})")
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    ax.set_xlabel(cost)
    ax.set_ylabel(f"{metric} ({'lower' if lower else 'higher'} is better)")
    ax.set_title("\n".join(textwrap.wrap(title, 80)), fontsize=9)
    ax.grid(alpha=0.3)
    if missing:
        fig.text(0.01, 0.01, f"not placed (no {cost} or {metric}): {', '.join(missing)}", fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [placed[i][0] for i in front]


@dataclass
class CurvePanel:
    """One panel of curves.png: its label (the metric names plotted) and, per run id, the name its
    line shows (a run that logged none of the panel's names has no line)."""
    label: str
    plotted: dict[str, str]


def panel_label(names: tuple[str, ...], used: set[str]) -> str:
    """The names a panel shows, the preferred first: `val/zeroshot_top1`, or `val/zeroshot_top1
    (zeroshot/top1 where a run has no val/zeroshot_top1)` where some runs fell back."""
    shown = [n for n in names if n in used] or [names[0]]
    if len(shown) == 1:
        return shown[0]
    return f"{shown[0]} ({', '.join(shown[1:])} where a run has no {shown[0]})"


def curves_plot(groups: list[Group], panels: list[tuple[str, ...]], path: Path, title: str,
                x_metric: str | None = None, chance: dict[int, float] | None = None) -> list[CurvePanel]:
    """One panel per entry of `panels` (value against step), one line per run, coloured by group.
    A panel's entry lists metric names in order of preference: each run plots the first of them it
    has a history of (the per-epoch validation twin first, the metric itself for a run without one).
    x_metric: plotted against that metric's value at each point's step instead (the report's
    --x compute: efficiency/train_pflops_total; a run that never logged it is left out of the panel).
    chance: panel index -> what guessing scores there, a dashed line. One legend for the figure (a
    group has one colour in every panel), outside the axes.
    Returns what each panel plotted, its label being the y axis's."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 2, 4.2), squeeze=False,
                             layout="constrained")
    drawn = []
    legend = {}
    for index, (ax, names) in enumerate(zip(axes[0], panels)):
        plotted = {}
        for n, g in enumerate(groups):
            for k, run in enumerate(g.runs):
                name = next((m for m in names if run.history.get(m)), None)
                if name is None:
                    continue
                points = run.history[name]
                if x_metric is not None:
                    points = against(points, run.history.get(x_metric) or [])
                    if not points:
                        continue
                plotted[run.run_id] = name
                steps, values = zip(*points)
                line, = ax.plot(steps, values, color=f"C{n % 10}", lw=1, marker="." if len(points) < 30 else None,
                                alpha=0.85)
                legend.setdefault(g.label, line)
        if chance and index in chance:
            legend.setdefault("chance", ax.axhline(chance[index], color="0.4", ls="--", lw=1))
        label = panel_label(names, set(plotted.values()))
        drawn.append(CurvePanel(label, plotted))
        ax.set_xlabel(x_metric or "step")
        ax.set_ylabel("\n".join(textwrap.wrap(label, 60)))
        ax.grid(alpha=0.3)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside right upper", fontsize=7)
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def against(points: list[tuple[int, float]], x_points: list[tuple[int, float]]) -> list[tuple[float, float]]:
    """(step, value) -> (x at that step, value), x being another metric's history: its value logged at
    the step, else the last one before it; points before its first value are dropped."""
    xs = sorted(x_points)
    out, i, last = [], 0, None
    for step, value in sorted(points):
        while i < len(xs) and xs[i][0] <= step:
            last, i = xs[i][1], i + 1
        if last is not None:
            out.append((last, value))
    return out

