"""How long to wait before trying again: exponential backoff with equal jitter.

Shared by the SDK's call retries and the Scheduler's requeue of a failed request. The
ceiling doubles (``multiplier``) per attempt up to ``maximum``; the wait is drawn from the
upper half of it, so a crowd that failed together comes back spread out, yet never sooner
than half the ceiling.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["exponential_backoff"]


def exponential_backoff(
    attempt: int,
    initial: float,
    maximum: float,
    multiplier: float = 2.0,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds before retry ``attempt`` (1-based)."""
    ceiling = min(maximum, initial * multiplier ** max(0, attempt - 1))
    return ceiling / 2 + uniform(0, ceiling / 2)
