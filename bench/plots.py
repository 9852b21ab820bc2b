"""The benchmarks' plots: matplotlib with the Agg backend (no display), one PNG per scenario
under ``bench/results/``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.stats import RESULTS, relative

__all__ = ["Axes", "bars", "cdf", "figure"]


@contextlib.contextmanager
def figure(
    name: str,
    rows: int = 1,
    cols: int = 1,
    *,
    size: tuple[float, float] | None = None,
    title: str = "",
    saved: list[str] | None = None,
) -> Iterator[list[Axes]]:
    """A figure of ``rows`` x ``cols`` panels (row by row), saved as ``results/<name>.png``
    when the block ends; the saved path is appended to ``saved``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, grid = plt.subplots(rows, cols, figsize=size or (6.0 * cols, 4.2 * rows), squeeze=False)
    try:
        yield list(grid.flat)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = RESULTS / f"{name}.png"
        fig.savefig(path, dpi=110)
        if saved is not None:
            saved.append(relative(path))
    finally:
        plt.close(fig)


def bars(
    axis: Axes,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    ylabel: str = "",
    title: str = "",
    log: bool = False,
    fmt: str = "{:.3g}",
) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series in each, each bar
    labelled with its value (None draws no bar)."""
    width = 0.8 / max(1, len(series))
    for s, (label, values) in enumerate(series.items()):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        heights = [float("nan") if v is None else v for v in values]
        drawn = axis.bar(xs, heights, width, label=label)
        axis.bar_label(
            drawn, labels=["" if v is None else fmt.format(v) for v in values], fontsize=8
        )
    axis.set_xticks(range(len(groups)), groups)
    if log:
        axis.set_yscale("log")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.margins(y=0.15)
    if len(series) > 1:
        axis.legend(fontsize=8)


def cdf(
    axis: Axes,
    samples: Sequence[float],
    label: str,
    *,
    color: str | None = None,
    dashed: bool = False,
) -> None:
    """The empirical CDF of ``samples`` as a step line."""
    ordered = sorted(samples)
    n = len(ordered)
    if not n:
        return
    axis.step(
        ordered,
        [(i + 1) / n for i in range(n)],
        where="post",
        label=label,
        color=color,
        linestyle="--" if dashed else "-",
    )
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("fraction of requests")
