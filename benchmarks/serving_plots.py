"""PNG plots of serving runs (matplotlib, imported only here and only when a plot is drawn).

    plot_latency_cdfs   TTFT, TPOT, ITL and E2E CDFs, one line per run (a rate, or a deployment)
    plot_rate_sweep     achieved request throughput and goodput, output tokens/s, p50/p99 TTFT and TPOT against
                        the offered request rate, one line per deployment

Figures are built on matplotlib's object API with the Agg canvas: no pyplot, no global state.
"""
from __future__ import annotations

import importlib.util
import math

if __package__:
    from .serving_metrics import METRIC_TITLES, METRICS, metric_values_s
else:
    from serving_metrics import METRIC_TITLES, METRICS, metric_values_s


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(rows: int, cols: int, width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def plot_latency_cdfs(runs: list[tuple[str, list]], path: str, title: str = "") -> str:
    """runs: (label, RequestRecords); one panel per metric, log x when the values span > 50x."""
    fig, axes = _figure(2, 3, 16, 7.5)
    for ax in axes.flat[len(METRICS):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, METRICS):
        lowest, highest = math.inf, 0.0
        for label, records in runs:
            values = sorted(v * 1e3 for v in metric_values_s(records)[name])
            if not values:
                continue
            n = len(values)
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", label=label)
            lowest, highest = min(lowest, values[0]), max(highest, values[-1])
        if lowest > 0 and highest / lowest > 50:
            ax.set_xscale("log")
        ax.set_title(METRIC_TITLES[name], fontsize=10)
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("fraction of " + ("gaps" if name == "itl" else "requests"))
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if ax.lines and len(runs) > 1:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path


def _rate_positions(rates: list[float]) -> tuple[dict[float, float], list[float], list[str]]:
    """x position of each offered rate: itself, and inf placed past the largest finite rate."""
    finite = sorted({r for r in rates if not math.isinf(r)})
    inf_x = finite[-1] * 1.5 if finite else 1.0
    positions = {r: (inf_x if math.isinf(r) else r) for r in rates}
    ticks = finite + ([inf_x] if any(math.isinf(r) for r in rates) else [])
    return positions, ticks, [f"{t:g}" for t in finite] + (["inf"] if len(ticks) > len(finite) else [])


def plot_rate_sweep(series: dict[str, list[tuple[float, dict]]], path: str, title: str = "") -> str:
    """series: deployment -> [(offered request rate, summary)]."""
    rates = [rate for points in series.values() for rate, _ in points]
    positions, ticks, tick_labels = _rate_positions(rates)
    panels = [("requests/s completed (solid) and goodput (dashed)", [("request_throughput", "-"),
                                                                      ("request_goodput", "--")]),
              ("output tokens/s", [("output_throughput", "-")]),
              ("TTFT ms: median (solid), p99 (dashed)", [("median_ttft_ms", "-"), ("p99_ttft_ms", "--")]),
              ("TPOT ms: median (solid), p99 (dashed)", [("median_tpot_ms", "-"), ("p99_tpot_ms", "--")])]
    fig, axes = _figure(2, 2, 11, 7.5)
    colors = [f"C{i}" for i in range(10)]
    for ax, (panel_title, keys) in zip(axes.flat, panels):
        for color, (name, points) in zip(colors * 10, series.items()):
            points = sorted(points, key=lambda p: positions[p[0]])
            for key, style in keys:
                xs = [positions[rate] for rate, s in points if s.get(key) is not None]
                ys = [s[key] for rate, s in points if s.get(key) is not None]
                if xs:
                    ax.plot(xs, ys, style, marker="o", color=color, label=name if style == "-" else None)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("offered request rate (req/s)")
        ax.set_xticks(ticks, tick_labels)
        ax.grid(True, alpha=0.3)
        if any(line.get_label() and not line.get_label().startswith("_") for line in ax.lines):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
