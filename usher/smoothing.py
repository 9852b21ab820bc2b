"""Exponentially weighted moving averages (pure): the Scheduler's service-time and
output-length averages for ETAs and the Pool's per-instance latency and error rate."""

from __future__ import annotations

__all__ = ["EWMA_ALPHA", "ewma", "ewma_variance"]

#: Weight of the newest sample in the moving averages (about the last 10 requests matter).
EWMA_ALPHA = 0.2


def ewma(previous: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    """Next moving average; the first sample stands alone."""
    if previous is None:
        return sample
    return previous + alpha * (sample - previous)


def ewma_variance(
    previous_var: float | None,
    previous_mean: float | None,
    sample: float,
    alpha: float = EWMA_ALPHA,
) -> float:
    """Next exponentially weighted variance (West's incremental form)."""
    if previous_var is None or previous_mean is None:
        return 0.0
    delta = sample - previous_mean
    return (1 - alpha) * (previous_var + alpha * delta * delta)
