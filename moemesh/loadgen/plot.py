"""The benchmark's figure: throughput and latency percentiles against concurrency or rate, one line per target."""

from __future__ import annotations

import pathlib

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from moemesh.loadgen.runner import TargetResult

THROUGHPUTS = (("output tokens/s", "output_throughput"), ("requests/s", "request_throughput"))
LATENCIES = (("TTFT (ms)", "ttft_ms"), ("TPOT (ms)", "tpot_ms"), ("ITL (ms)", "itl_ms"), ("E2E latency (ms)", "e2e_ms"))
PERCENTILE_STYLES = (("p50", "-"), ("p90", "--"), ("p99", ":"))


def _x_label(results: list[TargetResult]) -> str:
    modes = {level.level.mode for result in results for level in result.levels}
    return "concurrency (requests in flight)" if modes == {"concurrency"} else "rate (requests/s)"


def _plot_throughput(axes: Axes, results: list[TargetResult], field: str) -> None:
    for color, result in enumerate(results):
        xs = [level.level.value for level in result.levels]
        ys = [getattr(level.metrics, field) for level in result.levels]
        axes.plot(xs, ys, marker="o", color=f"C{color}", label=result.target.url)


def _plot_latency(axes: Axes, results: list[TargetResult], field: str) -> None:
    for color, result in enumerate(results):
        xs = [level.level.value for level in result.levels]
        for percentile, style in PERCENTILE_STYLES:
            ys = [getattr(getattr(level.metrics, field), percentile) for level in result.levels]
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                axes.plot(*zip(*points), linestyle=style, marker="o", markersize=3, color=f"C{color}")


def _load_axis(axes: Axes, results: list[TargetResult]) -> None:
    """Ticks at the measured levels; a log scale when they span a factor of 8 or more."""
    values = sorted({level.level.value for result in results for level in result.levels})
    if values and min(values) > 0 and max(values) / min(values) >= 8:
        axes.set_xscale("log", base=2)
    axes.set_xticks(values, [f"{v:g}" for v in values])
    axes.minorticks_off()
    axes.set_xlabel(_x_label(results))


def write_png(path: pathlib.Path, results: list[TargetResult]) -> None:
    """Six panels, two throughputs and four latencies (p50 solid, p90 dashed, p99 dotted), saved as PNG."""
    # A bare Figure on the Agg canvas: no pyplot, so no global backend or figure registry is touched.
    figure = Figure(figsize=(15, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(2, 3)
    panels = list(grid.flat)
    for axes, (title, field) in zip(panels, THROUGHPUTS):
        _plot_throughput(axes, results, field)
        axes.set_title(title)
    for axes, (title, field) in zip(panels[len(THROUGHPUTS):], LATENCIES):
        _plot_latency(axes, results, field)
        axes.set_title(title)
    for axes in panels:
        _load_axis(axes, results)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize="small")
    panels[2].legend([Line2D([], [], color="grey", linestyle=style) for _, style in PERCENTILE_STYLES],
                     [name for name, _ in PERCENTILE_STYLES], fontsize="small")
    figure.suptitle("moemesh bench")
    figure.savefig(path, dpi=100)
