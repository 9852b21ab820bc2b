"""The words users see while they wait (pure): positions, wait ranges, progress.

Follows the product requirements: "You are #3 of 7 in the queue • Estimated wait: 2–3
minutes", "Processing is 80% complete • Almost ready!", "Your response is ready!
Processing took 45 seconds."
"""

from __future__ import annotations

import math

__all__ = [
    "duration_phrase",
    "position_message",
    "progress_message",
    "ready_message",
    "wait_phrase",
]


def _unit(value: int, unit: str) -> str:
    return f"{value} {unit}" if value == 1 else f"{value} {unit}s"


def duration_phrase(seconds: float) -> str:
    """45 seconds, 1 minute, 3 minutes, 2 hours."""
    if seconds < 60:
        return _unit(max(1, round(seconds)), "second")
    if seconds < 3600:
        return _unit(round(seconds / 60), "minute")
    return _unit(round(seconds / 3600), "hour")


def wait_phrase(min_seconds: float, max_seconds: float) -> str:
    """A human range: "less than a minute", "2–3 minutes", "about 1 hour"."""
    low, high = sorted((max(0.0, min_seconds), max(0.0, max_seconds)))
    if high < 60:
        return "less than a minute"
    if high < 3600:
        lo, hi = max(1, math.floor(low / 60)), max(1, math.ceil(high / 60))
        return _unit(hi, "minute") if lo == hi else f"{lo}–{hi} minutes"
    lo, hi = max(1, math.floor(low / 3600)), math.ceil(high / 3600)
    return f"about {_unit(hi, 'hour')}" if lo == hi else f"{lo}–{hi} hours"


def position_message(
    position: int, queue_length: int, min_seconds: float, max_seconds: float
) -> str:
    return (
        f"You are #{position} of {queue_length} in the queue • "
        f"Estimated wait: {wait_phrase(min_seconds, max_seconds)}"
    )


def progress_message(fraction: float) -> str:
    percent = max(0, min(100, round(fraction * 100)))
    if percent >= 80:
        return f"Processing is {percent}% complete • Almost ready!"
    return f"Processing is {percent}% complete"


def ready_message(processing_seconds: float) -> str:
    return f"Your response is ready! Processing took {duration_phrase(processing_seconds)}."
