"""Routing decisions (services/pool/routing.py)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.pool.routing import Candidate, Strategy, choose, eligible, rank


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.instance for c in candidates]


# --- Eligibility --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"healthy": False},
        {"circuit_allows": False},
        {"draining": True},
        {"serves_model": False},
        {"free_slots": 0},
        {"weight": 0.0},
        {"model_loaded": False, "can_load": False},
    ],
)
def test_ineligible_instances_are_never_ranked(change: dict[str, Any]) -> None:
    bad = replace(Candidate("bad", model_loaded=True), **change)
    good = Candidate("good", active=50, parallel=60, free_slots=1, model_loaded=False)
    assert not eligible(bad)
    for strategy in Strategy:
        assert ids(rank([bad, good], strategy)) == ["good"]
        assert ids(rank([bad], strategy)) == []
    assert choose([bad]) is None


def test_loaded_model_is_eligible_even_if_nothing_else_fits() -> None:
    assert eligible(Candidate("a", model_loaded=True, can_load=False))


# --- Affinity ------------------------------------------------------------------------------------


def test_affinity_prefers_loaded_instance_even_when_busier() -> None:
    loaded = Candidate("b-loaded", model_loaded=True, active=7, parallel=8, free_slots=1)
    cold = Candidate("a-cold", active=0, parallel=8, free_slots=8, weight=10)
    assert ids(rank([cold, loaded])) == ["b-loaded", "a-cold"]


def test_affinity_skips_loaded_instance_without_free_slot() -> None:
    full = Candidate("full", model_loaded=True, active=4, parallel=4, free_slots=0)
    cold = Candidate("cold", free_slots=4, parallel=4)
    assert ids(rank([full, cold])) == ["cold"]


def test_affinity_reload_ranks_like_a_load_or_last_when_busy() -> None:
    warm = Candidate("warm", model_loaded=True, active=3, parallel=4, free_slots=1)
    cold = Candidate("cold", parallel=4, free_slots=4, active=1)
    idle_reload = Candidate(
        "idle-reload", model_loaded=True, needs_reload=True, free_slots=4, parallel=4
    )
    busy_reload = Candidate(
        "busy-reload", model_loaded=True, needs_reload=True, free_slots=2, parallel=4
    )
    order = ids(rank([busy_reload, idle_reload, cold, warm]))
    assert order == ["warm", "idle-reload", "cold", "busy-reload"]


def test_affinity_balances_outstanding_work_by_weight() -> None:
    a = Candidate("a", model_loaded=True, active=3, weight=1, parallel=8, free_slots=5)
    b = Candidate("b", model_loaded=True, active=5, weight=3, parallel=8, free_slots=3)
    # (3+1)/1 = 4 against (5+1)/3 = 2: the heavier instance takes it despite more work.
    assert ids(rank([a, b])) == ["b", "a"]


def test_affinity_idle_instances_differ_by_weight() -> None:
    light = Candidate("a", weight=1, model_loaded=True)
    heavy = Candidate("b", weight=2, model_loaded=True)
    assert ids(rank([light, heavy])) == ["b", "a"]


def test_affinity_penalises_errors_and_latency() -> None:
    clean = Candidate("z-clean", model_loaded=True, active=1, parallel=4, free_slots=3)
    flaky = Candidate(
        "a-flaky", model_loaded=True, active=0, error_rate=0.5, parallel=4, free_slots=4
    )
    assert ids(rank([flaky, clean])) == ["z-clean", "a-flaky"]  # 2 * 1 < 1 * 3
    fast = Candidate("z-fast", model_loaded=True, active=1, latency_seconds=1.0)
    slow = Candidate("a-slow", model_loaded=True, active=0, latency_seconds=10.0)
    assert ids(rank([slow, fast])) == ["z-fast", "a-slow"]  # 2 * 1 < 1 * (1 + 0.5 * 4)


def test_affinity_ties_break_by_id() -> None:
    cands = [Candidate(name, model_loaded=True) for name in ("c", "a", "b")]
    assert ids(rank(cands)) == ["a", "b", "c"]
    assert ids(rank(list(reversed(cands)))) == ["a", "b", "c"]


def test_affinity_uses_busy_slots_as_second_key() -> None:
    a = Candidate("a", model_loaded=True, active=2, parallel=4, free_slots=2)
    b = Candidate("b", model_loaded=True, active=2, parallel=4, free_slots=3)
    assert ids(rank([a, b])) == ["b", "a"]


# --- Least connections and latency ---------------------------------------------------------------


def test_least_connections_picks_min_active_per_weight() -> None:
    cands = [
        Candidate("a", active=2, weight=1),
        Candidate("b", active=3, weight=2),  # 1.5
        Candidate("c", active=1, weight=0.5),  # 2
        Candidate("d", active=4, weight=4, model_loaded=True),  # 1
    ]
    assert ids(rank(cands, Strategy.LEAST_CONNECTIONS)) == ["d", "b", "a", "c"]


@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.floats(0.1, 10)),
        min_size=1,
        max_size=20,
        unique_by=lambda t: t,
    )
)
def test_least_connections_first_is_a_minimum(pairs: list[tuple[int, float]]) -> None:
    cands = [Candidate(f"i{n}", active=a, weight=w) for n, (a, w) in enumerate(pairs)]
    best = rank(cands, Strategy.LEAST_CONNECTIONS)[0]
    assert best.active / best.weight == min(c.active / c.weight for c in cands)


def test_latency_strategy() -> None:
    cands = [
        Candidate("a", latency_seconds=2.0),
        Candidate("b", latency_seconds=1.0, error_rate=0.5),  # 1.5
        Candidate("c", latency_seconds=1.2),
        Candidate("d", latency_seconds=0.0),  # unknown: tried first
    ]
    assert ids(rank(cands, "latency")) == ["d", "c", "b", "a"]


# --- Weighted round robin ------------------------------------------------------------------------


def reference_turns(weights: list[float], count: int) -> list[int]:
    """The first ``count`` turns of stride scheduling, with exact rationals."""
    exact = [Fraction(w) for w in weights]
    heap = sorted(
        (Fraction(2 * k + 1) / (2 * w), -weights[i], i)
        for i, w in enumerate(exact)
        for k in range(int(count * w / sum(exact)) + 2)
    )
    return [i for _, _, i in heap[:count]]


def test_wrr_follows_weights() -> None:
    cands = [Candidate("a", weight=3), Candidate("b", weight=1)]
    picks = [rank(cands, Strategy.WEIGHTED_ROUND_ROBIN, rotation=r)[0].instance for r in range(8)]
    assert Counter(picks) == {"a": 6, "b": 2}
    assert picks[:4].count("a") == 3  # interleaved, not a burst of six


def test_wrr_ranks_everyone() -> None:
    cands = [Candidate(x, weight=w) for x, w in [("a", 1), ("b", 2), ("c", 3)]]
    for r in range(20):
        assert sorted(ids(rank(cands, "wrr", rotation=r))) == ["a", "b", "c"]


def test_wrr_rejects_negative_rotation() -> None:
    with pytest.raises(ValueError, match="rotation"):
        rank([Candidate("a"), Candidate("b")], Strategy.WEIGHTED_ROUND_ROBIN, rotation=-1)


weight_lists = st.lists(
    st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0, 10.0]) | st.floats(0.1, 10),
    min_size=1,
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(weights=weight_lists, start=st.integers(0, 10_000))
def test_wrr_distributes_proportionally(weights: list[float], start: int) -> None:
    cands = [Candidate(f"i{n}", weight=w) for n, w in enumerate(weights)]
    rounds = 200
    picks = Counter(
        rank(cands, Strategy.WEIGHTED_ROUND_ROBIN, rotation=r)[0].instance
        for r in range(start, start + rounds)
    )
    total = sum(weights)
    bound = 1 + len(weights) / 2  # ± one turn, plus the window's edges
    for n, w in enumerate(weights):
        assert abs(picks[f"i{n}"] - rounds * w / total) <= bound


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.integers(1, 6), min_size=1, max_size=6))
def test_wrr_matches_exact_stride_schedule(weights: list[int]) -> None:
    cands = [Candidate(f"i{n}", weight=float(w)) for n, w in enumerate(weights)]
    count = 60
    expected = [f"i{i}" for i in reference_turns([float(w) for w in weights], count)]
    got = [rank(cands, "weighted_round_robin", rotation=r)[0].instance for r in range(count)]
    assert got == expected


# --- Misc ----------------------------------------------------------------------------------------


def test_external_lane_is_separate() -> None:
    local = Candidate("local")
    provider = Candidate("openai", external=True)
    assert ids(rank([local, provider])) == ["local"]
    assert ids(rank([local, provider], external=True)) == ["openai"]
    assert sorted(ids(rank([local, provider], external=None))) == ["local", "openai"]


@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("affinity", Strategy.AFFINITY),
        ("WRR", Strategy.WEIGHTED_ROUND_ROBIN),
        ("weighted-round-robin", Strategy.WEIGHTED_ROUND_ROBIN),
        ("least_conn", Strategy.LEAST_CONNECTIONS),
        ("latency", Strategy.LATENCY),
    ],
)
def test_strategy_names(name: str, strategy: Strategy) -> None:
    assert Strategy.parse(name) is strategy


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="unknown routing strategy"):
        Strategy.parse("random")


candidates_st = st.lists(
    st.builds(
        Candidate,
        instance=st.text("abcdef", min_size=1, max_size=3),
        weight=st.floats(0.1, 5),
        healthy=st.booleans(),
        circuit_allows=st.booleans(),
        draining=st.booleans(),
        model_loaded=st.booleans(),
        needs_reload=st.booleans(),
        free_slots=st.integers(0, 4),
        active=st.integers(0, 10),
        parallel=st.integers(1, 4),
        latency_seconds=st.floats(0, 30),
        error_rate=st.floats(0, 1),
        can_load=st.booleans(),
    ),
    max_size=12,
    unique_by=lambda c: c.instance,
)


@given(cands=candidates_st, strategy=st.sampled_from(list(Strategy)), rotation=st.integers(0, 1000))
def test_rank_is_a_deterministic_permutation_of_the_eligible(
    cands: list[Candidate], strategy: Strategy, rotation: int
) -> None:
    ranked = rank(cands, strategy, rotation=rotation)
    assert sorted(ids(ranked)) == sorted(c.instance for c in cands if eligible(c))
    assert ranked == rank(list(reversed(cands)), strategy, rotation=rotation)


@given(cands=candidates_st)
def test_affinity_puts_warm_instances_first(cands: list[Candidate]) -> None:
    ranked = rank(cands)
    warm = [c.warm for c in ranked]
    assert warm == sorted(warm, reverse=True)


def test_decision_over_twenty_candidates_is_fast() -> None:
    cands = [
        Candidate(
            f"gpu-{n:02d}",
            weight=1 + n % 3,
            active=n % 5,
            model_loaded=n % 2 == 0,
            latency_seconds=n / 10,
        )
        for n in range(20)
    ]
    for strategy in Strategy:
        started = time.perf_counter()
        for r in range(200):
            rank(cands, strategy, rotation=r)
        per_decision = (time.perf_counter() - started) / 200
        assert per_decision < 0.002, (strategy, per_decision)  # goal: p99 < 1 ms; generous here
