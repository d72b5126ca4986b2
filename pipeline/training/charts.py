"""A run's metrics.jsonl drawn as PNGs: loss, objective, accuracy, step times, bubbles (`python -m pipeline.report`)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from pipeline.training.metrics import Metrics

COLOURS = {"loss": "#0072B2", "objective": "#D55E00", "accuracy": "#009E73", "test_loss": "#CC79A7",
           "time": "#56B4E9", "median": "#D55E00"}


def figure(width: float, height: float):
    """A headless matplotlib Figure (Agg); imported here so the CLI starts without torch."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:  # a GUI backend would need a display
        matplotlib.use("Agg")
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _column(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have `key`."""
    kept = [row for row in rows if isinstance(row.get(key), (int, float))]
    return [row["step"] for row in kept], [float(row[key]) for row in kept]


def _style(ax, title: str, xlabel: str = "step") -> None:
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(color="#e6e6e6", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)


def _log_if_wide(ax, values: list[float]) -> None:
    """A loss spanning more than a decade or so reads better on a log axis."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        from matplotlib import ticker
        ax.set_yscale("log")
        # 1-2-5 ticks in plain numbers: a decade or two of loss otherwise gets only two labels
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))


def draw_loss(ax, metrics: Metrics) -> None:
    """Training loss and objective (loss + regulariser) against step."""
    for key in ("loss", "objective"):
        steps, values = _column(metrics.train, key)
        if steps:
            ax.plot(steps, values, color=COLOURS[key], linewidth=1.4, label=key,
                    marker="o" if len(steps) < 30 else None, markersize=3)
    _log_if_wide(ax, _column(metrics.train, "objective")[1] + _column(metrics.train, "loss")[1])
    _style(ax, "training loss")
    ax.legend(fontsize=8, frameon=False)


def draw_accuracy(ax, metrics: Metrics) -> None:
    """Test accuracy (left axis) and test loss (right axis) against step."""
    steps, accuracy = _column(metrics.evals, "test_accuracy")
    ax.plot(steps, accuracy, color=COLOURS["accuracy"], linewidth=1.4, marker="o", markersize=3)
    ax.set_ylabel("test accuracy", color=COLOURS["accuracy"], fontsize=9)
    _style(ax, "evaluation")
    steps, loss = _column(metrics.evals, "test_loss")
    if steps:
        right = ax.twinx()
        right.plot(steps, loss, color=COLOURS["test_loss"], linewidth=1.2, linestyle="--",
                   marker="s", markersize=3)
        right.set_ylabel("test loss", color=COLOURS["test_loss"], fontsize=9)
        right.tick_params(labelsize=8)
        right.spines["top"].set_visible(False)


def draw_step_time(ax, metrics: Metrics) -> None:
    """Histogram of step times in ms, the median marked and written in the legend."""
    _, seconds = _column(metrics.train, "step_time_s")
    ms = [s * 1000 for s in seconds]
    ax.hist(ms, bins=min(40, max(5, len(ms) // 3)), color=COLOURS["time"], edgecolor="white")
    median = statistics.median(ms)
    ax.axvline(median, color=COLOURS["median"], linewidth=1.6, label=f"median {median:.3g} ms")
    _style(ax, f"step time ({len(ms)} logged steps)", xlabel="ms")
    ax.set_ylabel("steps", fontsize=9)
    ax.legend(fontsize=8, frameon=False)


def draw_throughput(ax, metrics: Metrics) -> None:
    """Samples per second against step: the fourth panel of report.png."""
    steps, rate = _column(metrics.train, "samples_per_s")
    ax.plot(steps, rate, color=COLOURS["loss"], linewidth=1.2)
    _style(ax, "throughput")
    ax.set_ylabel("samples / s", fontsize=9)


def draw_bubble(ax, metrics: Metrics) -> None:
    """Measured idle fraction per rank against step (rows that carry a "bubble" list)."""
    rows = [row for row in metrics.train if isinstance(row.get("bubble"), list)]
    for rank in range(max(len(row["bubble"]) for row in rows)):
        kept = [row for row in rows if rank < len(row["bubble"])]
        ax.plot([row["step"] for row in kept], [100 * row["bubble"][rank] for row in kept],
                linewidth=1.2, label=f"rank {rank}")
    _style(ax, "pipeline bubble")
    ax.set_ylabel("idle %", fontsize=9)
    ax.legend(fontsize=7, frameon=False, ncol=2)


Panel = Callable[[Any, Metrics], None]


def panels(metrics: Metrics) -> dict[str, Panel]:
    """The single-panel PNGs this run's rows can fill, by file name."""
    chosen: dict[str, Panel] = {}
    if metrics.train:
        chosen["loss.png"] = draw_loss
    if _column(metrics.evals, "test_accuracy")[0]:
        chosen["accuracy.png"] = draw_accuracy
    if _column(metrics.train, "step_time_s")[0]:
        chosen["step_time.png"] = draw_step_time
    if any(isinstance(row.get("bubble"), list) and row["bubble"] for row in metrics.train):
        chosen["bubble.png"] = draw_bubble
    elif _column(metrics.train, "samples_per_s")[0]:
        chosen["throughput.png"] = draw_throughput
    return chosen


def _save(fig, path: Path) -> Path:
    fig.savefig(path, facecolor="white")
    return path


def write_report(metrics: Metrics, out: Path, title: str = "") -> list[Path]:
    """Draw each panel to its own PNG, then all of them (up to four) in report.png."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = panels(metrics)
    written = []
    for name, draw in chosen.items():
        fig = figure(6.4, 4.0)
        draw(fig.add_subplot(), metrics)
        written.append(_save(fig, out / name))
    fig = figure(12.0, 8.0)
    for index, draw in enumerate(list(chosen.values())[:4], start=1):
        draw(fig.add_subplot(2, 2, index), metrics)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    written.append(_save(fig, out / "report.png"))
    return written
