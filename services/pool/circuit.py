"""Circuit breakers for instances and (instance, model) pairs, as a small state machine.

The Pool keeps one breaker per instance (the server is down, times out, answers 5xx) and
one per (instance, model) (this model crashes or runs out of memory there while others
work). A request is sent only when both admit it (``admit_all``).

Rule: the circuit opens when ``failure_threshold`` failures fall within the last
``failure_window_seconds``. A sliding window rather than a consecutive-failures count,
because a local model server interleaves requests of several callers: a server that fails
every other request would never trip a consecutive rule. Successes in the closed state
therefore do not clear the window; old failures simply age out of it. Only failures the
instance caused should be recorded (connection errors, timeouts, 5xx, a mid-stream
``{"error": ...}``); a caller's bad request (4xx) is not the instance's fault.

Open → half-open once the open timer runs out; half-open admits ``half_open_max_calls``
trial calls at a time. The first trial success closes the circuit; a trial failure reopens
it with the open time multiplied by ``backoff_multiplier`` (capped at
``max_open_seconds``), so an instance that keeps failing its probes is probed less and less
often, while one that recovers is back after ``open_seconds``.

Time is passed in (monotonic seconds as floats), so every transition is reproducible in
tests; nothing here reads a clock, sleeps or locks (the Pool runs on one event loop).
Every call admitted in the half-open state must end in ``record_success``,
``record_failure`` or ``release``, or the trial slot stays taken.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from usher.v1 import pool_pb2

__all__ = [
    "CircuitBreaker",
    "CircuitConfig",
    "CircuitSnapshot",
    "CircuitState",
    "admit_all",
]


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def to_proto(self) -> pool_pb2.CircuitState.ValueType:
        return _TO_PROTO[self]

    @classmethod
    def from_proto(cls, value: pool_pb2.CircuitState.ValueType) -> CircuitState:
        """The state a proto value names (UNSPECIFIED reads as CLOSED, the proto3 default)."""
        for state, proto in _TO_PROTO.items():
            if proto == value:
                return state
        return cls.CLOSED


_TO_PROTO: dict[CircuitState, pool_pb2.CircuitState.ValueType] = {
    CircuitState.CLOSED: pool_pb2.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: pool_pb2.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: pool_pb2.CIRCUIT_STATE_HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class CircuitConfig:
    """Thresholds of one breaker (the Pool's settings give the defaults)."""

    failure_threshold: int = 5
    failure_window_seconds: float = 30.0
    open_seconds: float = 10.0
    half_open_max_calls: int = 1
    #: Each failed probe multiplies the next open period by this (1 = no backoff).
    backoff_multiplier: float = 2.0
    #: Longest open period, however many probes failed (never shorter than open_seconds).
    max_open_seconds: float = 300.0

    def __post_init__(self) -> None:
        problems = []
        if self.failure_threshold < 1:
            problems.append("failure_threshold must be at least 1")
        if self.failure_window_seconds <= 0:
            problems.append("failure_window_seconds must be positive")
        if self.open_seconds <= 0:
            problems.append("open_seconds must be positive")
        if self.half_open_max_calls < 1:
            problems.append("half_open_max_calls must be at least 1")
        if self.backoff_multiplier < 1:
            problems.append("backoff_multiplier must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))

    def open_period(self, failed_probes: int) -> float:
        """How long the circuit stays open after ``failed_probes`` failed half-open trials."""
        period = self.open_seconds * self.backoff_multiplier ** min(failed_probes, 64)
        return min(period, max(self.max_open_seconds, self.open_seconds))


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """A breaker's state for stats and ListInstances."""

    state: CircuitState
    #: Failures inside the window (closed), or that tripped it (open / half-open).
    recent_failures: int
    #: When the circuit last opened; None if it never did.
    opened_at: float | None
    #: When an open circuit lets trial calls through; None unless open.
    retry_at: float | None
    trials_in_flight: int
    #: Failed half-open probes since the circuit last closed (drives the backoff).
    failed_probes: int
    times_opened: int
    successes: int
    failures: int


class CircuitBreaker:
    """One circuit: closed → open → half-open → closed (or open again)."""

    __slots__ = (
        "_failed_probes",
        "_failure_times",
        "_failures",
        "_opened_at",
        "_retry_at",
        "_state",
        "_successes",
        "_times_opened",
        "_trials",
        "config",
    )

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        failure_window_seconds: float = 30.0,
        open_seconds: float = 10.0,
        half_open_max_calls: int = 1,
        backoff_multiplier: float = 2.0,
        max_open_seconds: float = 300.0,
    ) -> None:
        self.config = CircuitConfig(
            failure_threshold=failure_threshold,
            failure_window_seconds=failure_window_seconds,
            open_seconds=open_seconds,
            half_open_max_calls=half_open_max_calls,
            backoff_multiplier=backoff_multiplier,
            max_open_seconds=max_open_seconds,
        )
        self._failure_times: deque[float] = deque(maxlen=self.config.failure_threshold)
        self._state = CircuitState.CLOSED
        self._opened_at: float | None = None
        self._retry_at = 0.0
        self._trials = 0
        self._failed_probes = 0
        self._times_opened = 0
        self._successes = 0
        self._failures = 0

    @classmethod
    def from_config(cls, config: CircuitConfig) -> CircuitBreaker:
        return cls(
            failure_threshold=config.failure_threshold,
            failure_window_seconds=config.failure_window_seconds,
            open_seconds=config.open_seconds,
            half_open_max_calls=config.half_open_max_calls,
            backoff_multiplier=config.backoff_multiplier,
            max_open_seconds=config.max_open_seconds,
        )

    def state(self, now: float) -> CircuitState:
        """The state at ``now`` (an open circuit whose timer ran out reads half-open)."""
        self._advance(now)
        return self._state

    def would_allow(self, now: float) -> bool:
        """Whether ``allow`` would admit a call now, without reserving a trial.

        For ranking candidates: checking twenty instances must not take twenty trials.
        """
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN:
            return self._trials < self.config.half_open_max_calls
        return False

    def allow(self, now: float) -> bool:
        """Admit a call now? In the half-open state this takes one of the trial slots."""
        if not self.would_allow(now):
            return False
        if self._state is CircuitState.HALF_OPEN:
            self._trials += 1
        return True

    def release(self, now: float) -> None:
        """Give back an admitted call that never reached the instance (no verdict)."""
        self._advance(now)
        if self._state is CircuitState.HALF_OPEN and self._trials > 0:
            self._trials -= 1

    def record_success(self, now: float) -> None:
        """A call succeeded. In the half-open state this closes the circuit.

        A success reported while open (a call admitted before the circuit opened) changes
        nothing: the instance gets its probe when the timer runs out.
        """
        self._advance(now)
        self._successes += 1
        if self._state is CircuitState.HALF_OPEN:
            self._close()

    def record_failure(self, now: float) -> None:
        """A call failed because of the instance (see the module docstring)."""
        self._advance(now)
        self._failures += 1
        if self._state is CircuitState.HALF_OPEN:
            self._failed_probes += 1
            self._open(now)
        elif self._state is CircuitState.CLOSED:
            self._failure_times.append(now)
            if len(self._failure_times) >= self.config.failure_threshold and (
                now - self._failure_times[0] <= self.config.failure_window_seconds
            ):
                self._open(now)
        # Open: a late failure of a call admitted earlier; the circuit is already open.

    def reset(self) -> None:
        """Close the circuit and forget its failures (the ResetCircuit admin call)."""
        self._close()

    def snapshot(self, now: float) -> CircuitSnapshot:
        state = self.state(now)
        if state is CircuitState.CLOSED:
            window_start = now - self.config.failure_window_seconds
            recent = sum(1 for t in self._failure_times if t >= window_start)
        else:
            recent = len(self._failure_times)
        return CircuitSnapshot(
            state=state,
            recent_failures=recent,
            opened_at=self._opened_at,
            retry_at=self._retry_at if state is CircuitState.OPEN else None,
            trials_in_flight=self._trials,
            failed_probes=self._failed_probes,
            times_opened=self._times_opened,
            successes=self._successes,
            failures=self._failures,
        )

    def _advance(self, now: float) -> None:
        if self._state is CircuitState.OPEN and now >= self._retry_at:
            self._state = CircuitState.HALF_OPEN
            self._trials = 0

    def _open(self, now: float) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = now
        self._retry_at = now + self.config.open_period(self._failed_probes)
        self._trials = 0
        self._times_opened += 1

    def _close(self) -> None:
        self._state = CircuitState.CLOSED
        self._failure_times.clear()
        self._trials = 0
        self._failed_probes = 0

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self._state.value}, failures={len(self._failure_times)})"


def admit_all(breakers: Iterable[CircuitBreaker], now: float) -> bool:
    """Admit a call only if every breaker does (e.g. the instance's and the model's there).

    All are checked before any trial is reserved, so a refusal by one breaker never leaves
    a half-open trial taken on another.
    """
    chosen = list(dict.fromkeys(breakers))  # the same breaker twice counts once
    if not all(b.would_allow(now) for b in chosen):
        return False
    for b in chosen:
        b.allow(now)
    return True
