"""Demand-driven model placement (services/pool/placement.py)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from services.pool.placement import (
    Action,
    InstanceView,
    LoadedInfo,
    evictions_to_fit,
    plan,
    serves,
)

GB = 1_000_000_000
MODELS = ("llama3.2", "qwen2.5", "mistral", "phi3", "gemma2")
SIZES = {"llama3.2": 2 * GB, "qwen2.5": 5 * GB, "mistral": 4 * GB, "phi3": 3 * GB, "gemma2": 6 * GB}
ALL = frozenset(MODELS)


def view(
    id: str = "gpu-1",
    loaded: Sequence[LoadedInfo] = (),
    budget: int = 0,
    max_loaded: int = 0,
    **kw: object,
) -> InstanceView:
    base = InstanceView(
        id=id,
        memory_budget_bytes=budget,
        max_loaded_models=max_loaded,
        loaded=tuple(loaded),
        available_models=ALL,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def info(model: str, last_used: float = 0.0, active: int = 0) -> LoadedInfo:
    return LoadedInfo(model, SIZES[model], last_used=last_used, active=active)


def run(
    demand: dict[str, int],
    instances: Sequence[InstanceView],
    now: float = 1000.0,
    idle: float = 600.0,
    scale_out: int = 8,
) -> list[Action]:
    return plan(
        demand, SIZES, instances, now, idle_unload_seconds=idle, scale_out_queue_length=scale_out
    )


def kinds(actions: list[Action]) -> list[tuple[str, str, str]]:
    return [(a.kind, a.instance, a.model) for a in actions]


# --- evictions_to_fit ----------------------------------------------------------------------------


def test_fits_without_evicting() -> None:
    assert evictions_to_fit(view(loaded=[info("phi3")], budget=10 * GB), 5 * GB, 0) == []
    assert evictions_to_fit(view(loaded=[info("phi3")]), 500 * GB, 0) == []  # unlimited


def test_evicts_least_recently_used_idle_first() -> None:
    v = view(
        loaded=[info("phi3", last_used=30), info("mistral", last_used=10), info("llama3.2", 20)],
        budget=10 * GB,
    )
    # 9 GB used; 5 GB more needs 4 GB freed: mistral (LRU, 4 GB) suffices.
    assert evictions_to_fit(v, 5 * GB, 100) == ["mistral"]
    # 8 GB needs 7 GB freed: mistral, then llama3.2 (2 GB), then phi3.
    assert evictions_to_fit(v, 8 * GB, 100) == ["mistral", "llama3.2", "phi3"]


def test_never_evicts_busy_or_protected_models() -> None:
    v = view(loaded=[info("mistral", active=1), info("phi3", last_used=5)], budget=8 * GB)
    assert evictions_to_fit(v, 4 * GB, 100) == ["phi3"]
    assert evictions_to_fit(v, 6 * GB, 100) is None  # would need mistral, which is busy
    assert evictions_to_fit(v, 4 * GB, 100, protect={"phi3"}) is None


def test_preloaded_models_go_last() -> None:
    v = view(
        loaded=[info("phi3", last_used=1), info("mistral", last_used=50)],
        budget=8 * GB,
        preload=frozenset({"phi3"}),
    )
    assert evictions_to_fit(v, 3 * GB, 100) == ["mistral"]


def test_max_loaded_models_counts() -> None:
    v = view(loaded=[info("phi3", last_used=2), info("mistral", last_used=1)], max_loaded=2)
    assert evictions_to_fit(v, 1, 100) == ["mistral"]
    assert evictions_to_fit(replace(v, max_loaded_models=3), 1, 100) == []


def test_too_big_for_the_budget() -> None:
    assert evictions_to_fit(view(budget=4 * GB), 5 * GB, 0) is None


def test_already_loaded_needs_nothing() -> None:
    v = view(loaded=[info("phi3")], budget=3 * GB, max_loaded=1)
    assert evictions_to_fit(v, 3 * GB, 0, model="phi3") == []


def test_min_idle_guards_against_thrashing() -> None:
    v = view(loaded=[info("phi3", last_used=95)], max_loaded=1)
    assert evictions_to_fit(v, 1, 100, min_idle_seconds=10) is None
    assert evictions_to_fit(v, 1, 110, min_idle_seconds=10) == ["phi3"]


# --- plan ----------------------------------------------------------------------------------------


def test_demand_loads_on_the_cheapest_instance() -> None:
    full = view("a", loaded=[info("qwen2.5", last_used=990)], budget=8 * GB)
    empty = view("b", budget=8 * GB)
    assert kinds(run({"mistral": 3}, [full, empty])) == [("load", "b", "mistral")]


def test_demand_evicts_lru_idle_then_loads() -> None:
    v = view(
        loaded=[info("qwen2.5", last_used=900), info("phi3", last_used=950)],
        budget=10 * GB,
    )
    actions = run({"mistral": 1}, [v])
    assert kinds(actions) == [("unload", "gpu-1", "qwen2.5"), ("load", "gpu-1", "mistral")]
    assert "mistral" in actions[0].reason


def test_no_load_when_the_model_is_already_served() -> None:
    v = view(loaded=[info("mistral", last_used=999, active=1)])
    assert run({"mistral": 3}, [v, view("b")]) == []


def test_scale_out_when_queue_is_long() -> None:
    a = view("a", loaded=[info("mistral", last_used=999, active=1)])
    b = view("b")
    assert run({"mistral": 7}, [a, b]) == []
    assert kinds(run({"mistral": 8}, [a, b])) == [("load", "b", "mistral")]
    both = replace(b, loaded=(info("mistral", 999),))
    assert run({"mistral": 15}, [a, both, view("c")]) == []
    assert kinds(run({"mistral": 16}, [a, both, view("c")])) == [("load", "c", "mistral")]
    assert run({"mistral": 100}, [a, b], scale_out=0) == []


def test_idle_models_are_unloaded_after_the_ttl() -> None:
    v = view(
        loaded=[
            info("phi3", last_used=300),  # idle 700 s: goes
            info("mistral", last_used=500),  # idle 500 s: stays
            info("qwen2.5", last_used=0, active=1),  # busy
            info("llama3.2", last_used=0),  # preloaded
            info("gemma2", last_used=0),  # queued demand
        ],
        preload=frozenset({"llama3.2"}),
    )
    actions = run({"gemma2": 1}, [v])
    assert kinds(actions) == [("unload", "gpu-1", "phi3")]
    assert run({"gemma2": 1}, [v], idle=0) == []


def test_missing_preloads_are_loaded() -> None:
    v = view(preload=frozenset({"phi3", "llama3.2"}))
    assert kinds(run({}, [v])) == [("load", "gpu-1", "llama3.2")]  # one at a time, by name
    v2 = replace(v, loaded=(info("llama3.2", 999),))
    assert kinds(run({}, [v2])) == [("load", "gpu-1", "phi3")]


def test_one_load_per_instance_per_plan() -> None:
    actions = run({"mistral": 5, "phi3": 9, "qwen2.5": 1}, [view("a"), view("b")])
    assert kinds(actions) == [("load", "a", "phi3"), ("load", "b", "mistral")]


def test_unhealthy_draining_and_external_instances_get_no_loads() -> None:
    instances = [
        view("a", healthy=False),
        view("b", draining=True),
        view("c", external=True),
        view("d", available_models=frozenset()),  # not pulled there
        view("e", allowed_models=frozenset({"phi3"})),
    ]
    assert run({"mistral": 5}, instances) == []


def test_model_on_an_unhealthy_instance_counts_as_not_loaded() -> None:
    down = view("a", healthy=False, loaded=[info("mistral", last_used=999)])
    assert kinds(run({"mistral": 1}, [down, view("b")])) == [("load", "b", "mistral")]


def test_draining_instance_still_unloads_idle_models() -> None:
    v = view(draining=True, loaded=[info("phi3", last_used=0)])
    assert kinds(run({}, [v])) == [("unload", "gpu-1", "phi3")]


def test_plan_is_deterministic_and_order_independent() -> None:
    instances = [
        view("a", budget=8 * GB, loaded=[info("phi3", 10), info("llama3.2", 20)]),
        view("b", budget=6 * GB, loaded=[info("qwen2.5", 990, active=2)]),
        view("c", budget=12 * GB, preload=frozenset({"gemma2"})),
    ]
    demand = {"mistral": 9, "qwen2.5": 20, "llama3.2": 1}
    first = run(demand, instances)
    shuffled = instances[:]
    random.Random(7).shuffle(shuffled)
    assert run(demand, shuffled) == first == run(dict(reversed(demand.items())), instances)


def test_serves_respects_allowed_and_available() -> None:
    assert serves(view(), "phi3")
    assert not serves(view(allowed_models=frozenset({"mistral"})), "phi3")
    assert not serves(view(available_models=frozenset()), "phi3")


# --- Properties ----------------------------------------------------------------------------------


@st.composite
def fleets(draw: st.DrawFn) -> list[InstanceView]:
    count = draw(st.integers(1, 4))
    out = []
    for n in range(count):
        loaded = draw(st.lists(st.sampled_from(MODELS), unique=True, max_size=4))
        budget = draw(st.sampled_from([0, 6 * GB, 10 * GB, 16 * GB]))
        out.append(
            InstanceView(
                id=f"i{n}",
                healthy=draw(st.booleans()) or n == 0,
                draining=draw(st.booleans()) and n != 0,
                memory_budget_bytes=budget,
                max_loaded_models=draw(st.integers(0, 3)),
                loaded=tuple(
                    LoadedInfo(
                        m,
                        SIZES[m],
                        last_used=draw(st.floats(0, 1000)),
                        active=draw(st.integers(0, 2)),
                    )
                    for m in loaded
                ),
                available_models=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=5)))
                | frozenset(loaded),
                preload=frozenset(draw(st.lists(st.sampled_from(MODELS), max_size=2))),
            )
        )
    return out


demands = st.dictionaries(st.sampled_from(MODELS), st.integers(0, 30), max_size=5)


def apply(instances: Sequence[InstanceView], actions: list[Action]) -> dict[str, list[LoadedInfo]]:
    """Carry the actions out in order, checking the limits after every load."""
    state = {v.id: list(v.loaded) for v in instances}
    views = {v.id: v for v in instances}
    for action in actions:
        models = state[action.instance]
        if action.kind == "unload":
            assert any(i.model == action.model for i in models), action
            state[action.instance] = [i for i in models if i.model != action.model]
            continue
        assert all(i.model != action.model for i in models), action
        models.append(LoadedInfo(action.model, SIZES[action.model], last_used=1000.0))
        v = views[action.instance]
        if v.memory_budget_bytes:
            assert sum(i.size_bytes for i in models) <= v.memory_budget_bytes, action
        if v.max_loaded_models:
            assert len(models) <= v.max_loaded_models, action
    return state


@settings(max_examples=300, deadline=None)
@given(
    instances=fleets(),
    demand=demands,
    now=st.floats(1000, 3000),
    idle=st.sampled_from([0.0, 600.0, 1e9]),  # 1e9 / 0: no idle unloads, so evictions happen
)
def test_plan_invariants(
    instances: list[InstanceView], demand: dict[str, int], now: float, idle: float
) -> None:
    actions = plan(
        demand, SIZES, instances, now, idle_unload_seconds=idle, scale_out_queue_length=8
    )
    apply(instances, actions)  # loads stay within memory and max-loaded after the unloads
    by_id = {v.id: v for v in instances}
    loads = [a for a in actions if a.kind == "load"]
    assert len({a.instance for a in loads}) == len(loads)  # one load per instance
    demand_loads = [a for a in loads if a.reason != "preload"]
    assert len({a.model for a in demand_loads}) == len(demand_loads)  # one instance per model
    for action in actions:
        v = by_id[action.instance]
        assert v.healthy and not v.external
        if action.kind == "unload":
            current = next(i for i in v.loaded if i.model == action.model)
            assert current.active == 0  # never unloads a busy model
            assert demand.get(action.model, 0) == 0  # nor one with queued requests
        else:
            assert not v.draining and serves(v, action.model)
    assert actions == plan(
        demand,
        SIZES,
        list(reversed(instances)),
        now,
        idle_unload_seconds=idle,
        scale_out_queue_length=8,
    )

    # A model with demand and no healthy host gets a load, unless every instance where it
    # could fit is already taking another load in this plan.
    loading = {a.instance for a in loads}
    for model, queued in demand.items():
        if queued <= 0:
            continue
        hosted = any(
            v.healthy and not v.draining and any(i.model == model for i in v.loaded)
            for v in instances
        )
        if hosted or any(a.model == model for a in loads):
            continue
        for v in instances:
            could_fit = (
                v.healthy
                and not v.draining
                and serves(v, model)
                and evictions_to_fit(v, SIZES[model], now, protect=set(demand)) is not None
            )
            assert not could_fit or v.id in loading, (model, v.id)


@settings(max_examples=200, deadline=None)
@given(instances=fleets(), model=st.sampled_from(MODELS), queued=st.integers(1, 30))
def test_single_demand_gets_a_load_when_any_instance_can_fit(
    instances: list[InstanceView], model: str, queued: int
) -> None:
    # No preloads, so nothing else competes for the one load per instance.
    instances = [replace(v, preload=frozenset()) for v in instances]
    actions = plan(
        {model: queued}, SIZES, instances, 2000.0, idle_unload_seconds=0, scale_out_queue_length=0
    )
    hosted = any(v.healthy and not v.draining and v.has_loaded(model) for v in instances)
    can_fit = any(
        v.healthy
        and not v.draining
        and serves(v, model)
        and evictions_to_fit(v, SIZES[model], 2000.0, protect={model}) is not None
        for v in instances
    )
    loads = [a for a in actions if a.kind == "load"]
    if not hosted and can_fit:
        assert [a.model for a in loads] == [model]
    else:
        assert loads == []
