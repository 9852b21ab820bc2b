"""Wait and finish estimates from a model's moving averages, as pure functions.

The scheduler keeps, per model, exponentially weighted moving averages of service time,
its variance, output tokens and tokens/s from completed requests. A queued request at
position p with k parallel slots starts after about (p - 1) / k full services plus the
remainder of the one in progress; the range widens with the service time's coefficient of
variation, so a model with steady requests gets a tight "2-3 minutes" and an erratic one an
honest wide range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "EWMA_ALPHA",
    "Estimate",
    "ModelAverages",
    "ewma",
    "ewma_variance",
    "queued_eta",
    "running_eta",
]

#: Weight of the newest sample in the moving averages (about the last 10 requests matter).
EWMA_ALPHA = 0.2
#: Bounds on the relative half-width of a range.
MIN_SPREAD = 0.15
MAX_SPREAD = 0.75


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


@dataclass(frozen=True, slots=True)
class ModelAverages:
    """What the scheduler has learned about a model from its completed requests."""

    service_seconds: float
    service_variance: float = 0.0
    output_tokens: float = 256.0
    tokens_per_second: float = 0.0
    #: The queue's fair clock (fairness.py) and how fast it has been moving (tokens/s).
    virtual_time: float = 0.0
    virtual_pace: float = 0.0

    @property
    def spread(self) -> float:
        if self.service_seconds <= 0:
            return MAX_SPREAD
        cv = math.sqrt(max(self.service_variance, 0.0)) / self.service_seconds
        return min(MAX_SPREAD, max(MIN_SPREAD, cv))


@dataclass(frozen=True, slots=True)
class Estimate:
    """A range in seconds, min <= max."""

    min_seconds: float
    max_seconds: float

    @property
    def mid_seconds(self) -> float:
        return (self.min_seconds + self.max_seconds) / 2


def queued_eta(
    position: int, parallel: int, averages: ModelAverages, start_tag: float | None = None
) -> Estimate:
    """Time until a request at 1-based ``position`` starts, with ``parallel`` slots serving.

    The place in line is a lower bound: under fair queuing, other tenants' later arrivals
    can be served first. When the request's start tag is known, the time for the queue's
    fair clock to reach it, at its recent pace, accounts for them; the later of the two wins.
    """
    if position < 1:
        raise ValueError("position is 1-based")
    slots = max(1, parallel)
    expected = ((position - 1) / slots + 0.5) * averages.service_seconds
    if start_tag is not None and averages.virtual_pace > 0 and start_tag > averages.virtual_time:
        expected = max(expected, (start_tag - averages.virtual_time) / averages.virtual_pace)
    spread = averages.spread
    return Estimate(expected * (1 - spread), expected * (1 + spread))


def running_eta(tokens_so_far: int, averages: ModelAverages, expected_output: float) -> Estimate:
    """Time until a running request finishes, from its progress and the model's speed."""
    remaining_tokens = max(0.0, expected_output - tokens_so_far)
    if averages.tokens_per_second > 0:
        expected = remaining_tokens / averages.tokens_per_second
    else:
        expected = averages.service_seconds * (remaining_tokens / max(expected_output, 1.0))
    spread = averages.spread
    return Estimate(expected * (1 - spread), expected * (1 + spread))
