"""When and how long the SDK waits before trying a call again.

UNAVAILABLE (the service restarting, a connection reset) is retried with exponential
backoff and jitter. RESOURCE_EXHAUSTED (a full queue, a rate limit) waits as long as the
server's google.rpc.RetryInfo asks, a little more so that a crowd of clients does not come
back at once. Either way a call gives up once its retries would exceed ``max_total_wait``.
Only calls that are safe to repeat go through here: Submit always carries an idempotency key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from clients.errors import UsherError, error_from_rpc
from usher.backoff import exponential_backoff

__all__ = ["NO_RETRY", "RetryEvent", "RetryPolicy", "call_with_retry"]


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """Passed to ``RetryPolicy.on_retry`` before each wait."""

    #: The method, e.g. "Submit".
    method: str
    #: 1 for the first retry.
    attempt: int
    #: Seconds the client is about to wait.
    delay: float
    error: UsherError


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0
    #: Retries stop when the time spent on one call (waits included) would pass this.
    max_total_wait: float = 30.0
    #: At most this many attempts of one call.
    max_attempts: int = 20
    retry_unavailable: bool = True
    retry_resource_exhausted: bool = True
    #: Extra wait on top of RetryInfo's delay, as a fraction of it (spreads a crowd out).
    retry_info_jitter: float = 0.1
    on_retry: Callable[[RetryEvent], None] | None = None

    def backoff(self, attempt: int) -> float:
        """Seconds before retry ``attempt`` (1-based): exponential with equal jitter."""
        return exponential_backoff(attempt, self.initial_backoff, self.max_backoff, self.multiplier)

    def delay_for(self, error: UsherError, attempt: int) -> float | None:
        """How long to wait before retrying after ``error``; None: do not retry."""
        if error.code == grpc.StatusCode.UNAVAILABLE and self.retry_unavailable:
            return self.backoff(attempt)
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_resource_exhausted:
            if error.retry_after is not None:
                jitter = random.uniform(0, error.retry_after * self.retry_info_jitter)
                return error.retry_after + jitter
            return self.backoff(attempt)
        return None


#: Fail at once (for calls that must not be repeated).
NO_RETRY = RetryPolicy(max_attempts=1, retry_unavailable=False, retry_resource_exhausted=False)


_T = TypeVar("_T")


async def call_with_retry(
    method: str, attempt_call: Callable[[], Awaitable[_T]], policy: RetryPolicy
) -> _T:
    """Run ``attempt_call`` until it succeeds, a non-retryable error, or the budget runs out.
    gRPC errors come out as typed ``UsherError``s."""
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await attempt_call()
        except grpc.RpcError as exc:
            error = error_from_rpc(exc)
            delay = policy.delay_for(error, attempt)
            spent = time.monotonic() - started
            if (
                delay is None
                or attempt >= policy.max_attempts
                or spent + delay > policy.max_total_wait
            ):
                raise error from None
        if policy.on_retry is not None:
            policy.on_retry(RetryEvent(method, attempt, delay, error))
        await asyncio.sleep(delay)
