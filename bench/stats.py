"""Small helpers for benchmark figures: percentiles, goals, the JSON summary line."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "emit", "goal", "latency_ms", "percentile", "relative", "tidy"]

#: Plots, profiles and summary.json land here (gitignored).
RESULTS = Path(__file__).resolve().parent / "results"


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples; NaN when there are none."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def latency_ms(samples: Sequence[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float]:
    """``{"p50_ms": …, "p95_ms": …, "p99_ms": …}`` of samples in seconds."""
    return {f"p{q}_ms": percentile(samples, q) * 1000 for q in qs}


def goal(measured: float | None, target: float, *, at_most: bool) -> dict[str, Any]:
    """A goal printed next to what was measured: ``met`` is None when nothing was."""
    met = None
    if measured is not None and not math.isnan(measured):
        met = measured <= target if at_most else measured >= target
    return {"target": f"{'<=' if at_most else '>='} {target:g}", "measured": measured, "met": met}


def relative(path: Path) -> str:
    """A results file as shown to people: relative to the repository when inside it."""
    try:
        return str(path.relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def tidy(value: Any) -> Any:
    """JSON-ready: floats rounded to 3 decimals, NaN and infinities as null, tuples as lists,
    all the way down nested dicts and lists."""
    if isinstance(value, float):
        return round(value, 3) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): tidy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [tidy(v) for v in value]
    return value


def emit(scenario: str, **figures: Any) -> None:
    """Print one scenario's summary as a JSON line."""
    print(json.dumps({"scenario": scenario, **tidy(figures)}), flush=True)
    sys.stdout.flush()
