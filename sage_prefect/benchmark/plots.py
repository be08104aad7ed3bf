"""Plots of benchmark results, as matplotlib figures (Agg, no display needed) that
`tracking.BenchmarkRun.log_figure` stores as PNG artifacts.

- `latency_cdf`: empirical CDFs of latencies (TTFT, e2e ...) per series (policy, class);
- `lines_vs_rate`: a metric against the request rate, one line per series (SLO attainment
  or goodput vs rate per policy);
- `grouped_bars`: metrics per group (accuracy per selector, attainment per policy);
- `comparison`: the runs of a `tracking.runs_table` side by side, one panel per metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["comparison", "grouped_bars", "latency_cdf", "lines_vs_rate", "save"]


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def latency_cdf(
    series: Mapping[str, Sequence[float]],
    title: str,
    xlabel: str = "latency (ms)",
    objective: float | None = None,
    log_x: bool = False,
) -> Figure:
    """Empirical CDF of each series (values in ms); ``objective`` draws a vertical SLO line."""
    import numpy as np

    fig = _figure()
    ax = fig.add_subplot()
    for label, values in series.items():
        data = np.sort(np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float))
        if data.size == 0:
            continue
        ax.step(data, np.arange(1, data.size + 1) / data.size, where="post", label=f"{label} (n={data.size})")
    if objective is not None:
        ax.axvline(
            objective, color="grey", linestyle="--", linewidth=1, label=f"objective {objective:.4g} ms"
        )
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def lines_vs_rate(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    ylabel: str,
    xlabel: str = "request rate (req/s)",
    ylim: tuple[float, float] | None = None,
    target: float | None = None,
) -> Figure:
    """``series[label] = (rates, values)``: one line with markers per label; ``target`` a dashed goal line."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"goal {target:g}")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def grouped_bars(
    groups: Mapping[str, Mapping[str, float]],
    title: str,
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
) -> Figure:
    """``groups[group][metric] = value``: bars per metric, grouped by group (e.g. selector)."""
    import numpy as np

    metrics: list[str] = []
    for values in groups.values():
        metrics += [m for m in values if m not in metrics]
    fig = _figure(max(6.0, 1.2 * len(groups) * max(1, len(metrics)) / 2 + 2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(groups))
    for i, metric in enumerate(metrics):
        heights = [float(groups[g].get(metric, float("nan"))) for g in groups]
        bars = ax.bar(x + (i - (len(metrics) - 1) / 2) * width, heights, width, label=metric)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(x, list(groups), rotation=15 if len(groups) > 4 else 0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(metrics) > 1:
        ax.legend(fontsize=8)
    return fig


def comparison(table: pd.DataFrame, metrics: Sequence[str], title: str) -> Figure:
    """One horizontal bar panel per metric (up to 9), one bar per run of ``table`` (`runs_table`)."""
    shown = [m for m in metrics if m in table.columns][:9]
    cols = min(3, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = _figure(4.2 * cols, 0.35 * max(3, len(table)) * rows + 1.2)
    labels = [f"{r}  {i}" if r else str(i) for r, i in zip(table["run"], table["run_id"], strict=True)]
    for n, metric in enumerate(shown):
        ax = fig.add_subplot(rows, cols, n + 1)
        values: list[Any] = [float(v) if v is not None else float("nan") for v in table[metric]]
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels if n % cols == 0 else [""] * len(values), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(metric, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(values):
            if math.isfinite(v):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle(title)
    return fig


def save(figure: Figure, path: str) -> str:
    """Write ``figure`` as PNG to ``path`` and return the path."""
    figure.savefig(path, format="png")
    return path
