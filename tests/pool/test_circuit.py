"""The circuit breaker's state machine (services/pool/circuit.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.pool.circuit import (
    CircuitBreaker,
    CircuitConfig,
    CircuitState,
    admit_all,
)
from usher.v1 import pool_pb2


def tripped(breaker: CircuitBreaker, now: float = 0.0) -> CircuitBreaker:
    for _ in range(breaker.config.failure_threshold):
        breaker.record_failure(now)
    return breaker


def test_starts_closed_and_admits() -> None:
    breaker = CircuitBreaker()
    assert breaker.state(0.0) is CircuitState.CLOSED
    assert breaker.allow(0.0)


def test_opens_after_threshold_failures_within_window() -> None:
    breaker = CircuitBreaker(failure_threshold=3, failure_window_seconds=10)
    breaker.record_failure(0.0)
    breaker.record_failure(4.0)
    assert breaker.state(4.0) is CircuitState.CLOSED
    breaker.record_failure(9.0)
    assert breaker.state(9.0) is CircuitState.OPEN
    assert not breaker.allow(9.5)


def test_failures_spread_beyond_the_window_do_not_open() -> None:
    breaker = CircuitBreaker(failure_threshold=3, failure_window_seconds=10)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):
        breaker.record_failure(t)
    assert breaker.state(24.0) is CircuitState.CLOSED


def test_successes_do_not_hide_interleaved_failures() -> None:
    """A server failing every other request trips the window rule."""
    breaker = CircuitBreaker(failure_threshold=3, failure_window_seconds=10)
    for t in range(6):
        if t % 2:
            breaker.record_failure(float(t))
        else:
            breaker.record_success(float(t))
    assert breaker.state(5.0) is CircuitState.OPEN


def test_half_open_after_timeout_admits_limited_trials() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=10, half_open_max_calls=2))
    assert breaker.state(9.99) is CircuitState.OPEN
    assert not breaker.would_allow(9.99)
    assert breaker.state(10.0) is CircuitState.HALF_OPEN
    assert breaker.would_allow(10.0)
    assert breaker.would_allow(10.0)  # checking reserves nothing
    assert breaker.allow(10.0)
    assert breaker.allow(10.0)
    assert not breaker.allow(10.0)
    assert breaker.snapshot(10.0).trials_in_flight == 2


def test_success_in_half_open_closes() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=10))
    assert breaker.allow(10.0)
    breaker.record_success(11.0)
    assert breaker.state(11.0) is CircuitState.CLOSED
    assert breaker.snapshot(11.0).recent_failures == 0
    # The window starts afresh: one failure does not reopen it.
    breaker.record_failure(11.5)
    assert breaker.state(11.5) is CircuitState.CLOSED


def test_failure_in_half_open_reopens_with_capped_backoff() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=10, backoff_multiplier=2, max_open_seconds=35))
    now = 10.0
    expected_periods = [20.0, 35.0, 35.0]  # 10 * 2, 10 * 4 capped at 35, still capped
    for period in expected_periods:
        assert breaker.allow(now)
        breaker.record_failure(now)
        assert breaker.state(now) is CircuitState.OPEN
        assert breaker.snapshot(now).retry_at == pytest.approx(now + period)
        assert breaker.state(now + period - 0.01) is CircuitState.OPEN
        now += period
        assert breaker.state(now) is CircuitState.HALF_OPEN
    breaker.allow(now)
    breaker.record_success(now)
    assert breaker.snapshot(now).failed_probes == 0
    # Backoff resets once it closed: the next trip opens for open_seconds again.
    tripped(breaker, now)
    assert breaker.snapshot(now).retry_at == pytest.approx(now + 10)


def test_release_returns_a_trial_slot() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=1))
    assert breaker.allow(1.0)
    assert not breaker.allow(1.0)
    breaker.release(1.0)
    assert breaker.allow(1.0)


def test_late_results_while_open_change_nothing() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=10))
    breaker.record_success(1.0)
    breaker.record_failure(2.0)
    snap = breaker.snapshot(2.0)
    assert snap.state is CircuitState.OPEN
    assert snap.retry_at == pytest.approx(10.0)
    assert snap.times_opened == 1


def test_reset_closes() -> None:
    breaker = tripped(CircuitBreaker())
    breaker.reset()
    assert breaker.state(0.0) is CircuitState.CLOSED
    assert breaker.allow(0.0)


def test_snapshot_counts() -> None:
    breaker = CircuitBreaker(failure_threshold=3, failure_window_seconds=10)
    breaker.record_success(0.0)
    breaker.record_failure(1.0)
    breaker.record_failure(2.0)
    snap = breaker.snapshot(5.0)
    assert (snap.state, snap.recent_failures, snap.successes, snap.failures) == (
        CircuitState.CLOSED,
        2,
        1,
        2,
    )
    assert breaker.snapshot(11.5).recent_failures == 1  # the first aged out
    assert snap.opened_at is None
    assert snap.retry_at is None


def test_admit_all_takes_no_trial_when_one_refuses() -> None:
    instance = tripped(CircuitBreaker(open_seconds=1))
    model = tripped(CircuitBreaker(open_seconds=100))
    assert not admit_all([instance, model], 1.0)
    assert instance.snapshot(1.0).trials_in_flight == 0
    assert admit_all([instance], 1.0)
    assert instance.snapshot(1.0).trials_in_flight == 1


def test_admit_all_counts_a_repeated_breaker_once() -> None:
    breaker = tripped(CircuitBreaker(open_seconds=1))
    assert admit_all([breaker, breaker], 1.0)
    assert breaker.snapshot(1.0).trials_in_flight == 1


@pytest.mark.parametrize(
    ("state", "proto"),
    [
        (CircuitState.CLOSED, pool_pb2.CIRCUIT_STATE_CLOSED),
        (CircuitState.OPEN, pool_pb2.CIRCUIT_STATE_OPEN),
        (CircuitState.HALF_OPEN, pool_pb2.CIRCUIT_STATE_HALF_OPEN),
    ],
)
def test_proto_mapping(state: CircuitState, proto: int) -> None:
    assert state.to_proto() == proto
    assert CircuitState.from_proto(state.to_proto()) is state
    assert state.value in ("closed", "open", "half_open")


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitConfig(failure_threshold=0)
    with pytest.raises(ValueError, match="open_seconds"):
        CircuitBreaker(open_seconds=0)
    with pytest.raises(ValueError, match="half_open_max_calls"):
        CircuitConfig(half_open_max_calls=0)


def test_from_config() -> None:
    config = CircuitConfig(failure_threshold=2, open_seconds=3)
    assert CircuitBreaker.from_config(config).config == config


# --- Properties against a reference model -----------------------------------------------------


@dataclass
class Model:
    """The rules written plainly, to compare the breaker against."""

    config: CircuitConfig
    state: CircuitState = CircuitState.CLOSED
    failures: tuple[float, ...] = ()
    retry_at: float = 0.0
    probes_failed: int = 0
    trials: int = 0

    def advance(self, now: float) -> None:
        if self.state is CircuitState.OPEN and now >= self.retry_at:
            self.state, self.trials = CircuitState.HALF_OPEN, 0

    def open(self, now: float) -> None:
        period = min(
            self.config.open_seconds * self.config.backoff_multiplier**self.probes_failed,
            max(self.config.max_open_seconds, self.config.open_seconds),
        )
        self.state, self.retry_at, self.trials = CircuitState.OPEN, now + period, 0


operations = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=8, allow_nan=False),
        st.sampled_from(["allow", "success", "failure", "release"]),
    ),
    max_size=80,
)
configs = st.builds(
    CircuitConfig,
    failure_threshold=st.integers(1, 4),
    failure_window_seconds=st.floats(1, 20),
    open_seconds=st.floats(1, 10),
    half_open_max_calls=st.integers(1, 3),
    backoff_multiplier=st.floats(1, 3),
    max_open_seconds=st.floats(1, 40),
)


@settings(max_examples=300)
@given(config=configs, ops=operations)
def test_breaker_follows_the_rules(config: CircuitConfig, ops: list[tuple[float, str]]) -> None:
    breaker = CircuitBreaker.from_config(config)
    model = Model(config)
    now = 0.0
    for step, op in ops:
        now += step
        model.advance(now)
        before = breaker.state(now)
        assert before is model.state
        if op == "allow":
            admitted = breaker.allow(now)
            if before is CircuitState.OPEN:
                # Never admits while open, before the timer runs out.
                assert not admitted
                assert now < model.retry_at
            elif before is CircuitState.CLOSED:
                assert admitted
            else:
                assert admitted == (model.trials < config.half_open_max_calls)
                model.trials += admitted
            assert model.trials <= config.half_open_max_calls
        elif op == "release":
            breaker.release(now)
            if model.state is CircuitState.HALF_OPEN and model.trials:
                model.trials -= 1
        elif op == "success":
            breaker.record_success(now)
            if model.state is CircuitState.HALF_OPEN:
                # A success in half-open closes.
                model.state, model.failures, model.probes_failed = CircuitState.CLOSED, (), 0
                assert breaker.state(now) is CircuitState.CLOSED
        else:
            breaker.record_failure(now)
            if model.state is CircuitState.HALF_OPEN:
                model.probes_failed += 1
                model.open(now)
                assert breaker.state(now) is CircuitState.OPEN
            elif model.state is CircuitState.CLOSED:
                model.failures = (*model.failures, now)
                recent = [t for t in model.failures if now - t <= config.failure_window_seconds]
                if len(recent) >= config.failure_threshold:
                    model.open(now)
        assert breaker.state(now) is model.state
        if model.state is CircuitState.OPEN:
            snap = breaker.snapshot(now)
            assert snap.retry_at == pytest.approx(model.retry_at)


def test_health_leaves_rotation_only_after_the_threshold_and_returns_on_one_good_check() -> None:
    from services.pool.registry import health_after_check

    healthy, failed = True, 0
    for expected in (True, True, False, False):
        healthy, failed = health_after_check(healthy, failed, False, 3)
        assert healthy is expected
    assert health_after_check(healthy, failed, True, 3) == (True, 0)
    # Never seen healthy: a failure keeps it out, whatever the threshold.
    assert health_after_check(False, 0, False, 5) == (False, 1)
    assert health_after_check(True, 0, False, 1) == (False, 1)
