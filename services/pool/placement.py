"""Which models to load and unload where, decided from demand (decisions only).

The Pool calls ``plan`` every few seconds with the scheduler's queue lengths and what each
instance has loaded; another module carries the actions out (an Ollama load is an empty
prompt, an unload the same with ``keep_alive: 0``). Rules, in the order they are applied:

1. **Idle unload.** A model nobody is using (no request running, none queued) whose last
   use is older than ``idle_unload_seconds`` is unloaded, unless it is preloaded on that
   instance (preloads are kept warm). Ollama unloads on its own after ``keep_alive``; this
   makes the fleet's TTL one setting, and frees memory before rule 2 needs it.
2. **Demand.** A model with queued requests that no healthy instance has loaded is loaded
   on the instance where it fits most cheaply; when its queue is at least
   ``scale_out_queue_length`` per instance serving it, it is loaded on one more instance.
   Models with the longest queues go first. Fitting may unload least-recently-used idle
   models first (``evictions_to_fit``); those unloads come before the load in the plan.
3. **Preload.** A preloaded model missing on its instance is loaded there.

Loads are slow (seconds to minutes) and compete for the same disk and GPU, so an instance
gets at most one load per plan, and a model gains at most one instance per plan; the next
call continues. Busy models (a request running) and models with queued requests are never
evicted, unhealthy instances are left alone (they cannot be reached) and draining
instances get no loads (only idle unloads). External providers manage their own models and
are skipped. A model whose size is unknown counts as 0 bytes (the server still has the
last word on memory), and a model is loaded only where the server has it and the instance
allows it; pulling is out of scope. Everything is deterministic: instances are considered
in id order, models in order of demand, then name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = [
    "Action",
    "InstanceView",
    "LoadedInfo",
    "evictions_to_fit",
    "plan",
    "serves",
]

ActionKind = Literal["load", "unload"]


@dataclass(frozen=True, slots=True)
class LoadedInfo:
    """A model loaded on an instance (from ``/api/ps`` plus the Pool's own counters)."""

    model: str
    size_bytes: int
    #: When a request for it last ran here (seconds, the Pool's clock).
    last_used: float
    #: Requests running on it now.
    active: int = 0
    num_ctx: int = 0


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What placement needs to know about one instance."""

    id: str
    healthy: bool = True
    draining: bool = False
    #: Memory the loaded models may use; 0 = unlimited.
    memory_budget_bytes: int = 0
    #: Models loaded at once; 0 = no limit.
    max_loaded_models: int = 0
    loaded: tuple[LoadedInfo, ...] = ()
    #: Models the server has (``/api/tags``).
    available_models: frozenset[str] = frozenset()
    #: Only these models may run here; empty = all.
    allowed_models: frozenset[str] = frozenset()
    preload: frozenset[str] = frozenset()
    external: bool = False

    def has_loaded(self, model: str) -> bool:
        return any(info.model == model for info in self.loaded)

    @property
    def used_bytes(self) -> int:
        return sum(info.size_bytes for info in self.loaded)


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    instance: str
    model: str
    #: Why, in words, for logs and the admin API.
    reason: str = field(default="", compare=False)


def serves(view: InstanceView, model: str) -> bool:
    """The server has the model and the instance's config allows it."""
    return model in view.available_models and (
        not view.allowed_models or model in view.allowed_models
    )


def evictions_to_fit(
    view: InstanceView,
    model_size: int,
    now: float,
    *,
    model: str | None = None,
    protect: Collection[str] = (),
    min_idle_seconds: float = 0.0,
) -> list[str] | None:
    """Models to unload, in order, so a model of ``model_size`` bytes fits; None if it can't.

    Fits means: total size within the memory budget and the count within
    ``max_loaded_models`` once the model is added. Only idle models may go (no request
    running, not in ``protect``, e.g. models with queued requests, and unused for at least
    ``min_idle_seconds`` at ``now``, a guard against thrashing): least recently used first,
    preloaded models only after all others. If ``model`` is already loaded nothing needs to
    go (``[]``), and it is never evicted to make room for itself.
    """
    if model is not None and view.has_loaded(model):
        return []
    budget = view.memory_budget_bytes
    limit = view.max_loaded_models
    if budget > 0 and model_size > budget:
        return None
    used = view.used_bytes
    count = len(view.loaded)

    def fits() -> bool:
        return (budget <= 0 or used + model_size <= budget) and (limit <= 0 or count < limit)

    if fits():
        return []
    idle = sorted(
        (
            info
            for info in view.loaded
            if info.active <= 0
            and info.model not in protect
            and info.model != model
            and now - info.last_used >= min_idle_seconds
        ),
        key=lambda info: (info.model in view.preload, info.last_used, info.model),
    )
    evicted: list[str] = []
    for info in idle:
        evicted.append(info.model)
        used -= info.size_bytes
        count -= 1
        if fits():
            return evicted
    return None


def plan(
    demand: Mapping[str, int],
    sizes: Mapping[str, int],
    instances: Sequence[InstanceView],
    now: float,
    *,
    idle_unload_seconds: float,
    scale_out_queue_length: int,
    min_idle_seconds: float = 0.0,
) -> list[Action]:
    """Loads and unloads that move the fleet toward the demand (see the module docstring).

    ``demand`` is queued requests per model; ``sizes`` the memory a model needs when
    loaded (bytes). ``idle_unload_seconds`` ≤ 0 disables idle unloads and
    ``scale_out_queue_length`` ≤ 0 disables scaling out. ``min_idle_seconds`` is passed to
    ``evictions_to_fit``.
    """
    planner = _Planner(demand, sizes, instances, now, min_idle_seconds)
    if idle_unload_seconds > 0:
        planner.idle_unloads(idle_unload_seconds)
    planner.demand_loads(scale_out_queue_length)
    planner.preloads()
    return planner.actions


class _Planner:
    """One plan in the making: the fleet as the actions so far leave it, rule by rule."""

    def __init__(
        self,
        demand: Mapping[str, int],
        sizes: Mapping[str, int],
        instances: Sequence[InstanceView],
        now: float,
        min_idle_seconds: float,
    ) -> None:
        self.demand = demand
        self.sizes = sizes
        self.now = now
        self.min_idle_seconds = min_idle_seconds
        self.state = {v.id: v for v in sorted(instances, key=lambda v: v.id)}
        self.actions: list[Action] = []
        self.loading: set[str] = set()  # instances that got their one load in this plan
        self.wanted = frozenset(m for m, n in demand.items() if n > 0)

    def unload(self, view_id: str, model: str, reason: str) -> None:
        view = self.state[view_id]
        loaded = tuple(i for i in view.loaded if i.model != model)
        self.state[view_id] = replace(view, loaded=loaded)
        self.actions.append(Action("unload", view_id, model, reason))

    def load(self, view_id: str, model: str, evict: list[str], reason: str) -> None:
        for victim in evict:
            self.unload(view_id, victim, f"evict least recently used idle model to fit {model}")
        view = self.state[view_id]
        info = LoadedInfo(model, self.sizes.get(model, 0), last_used=self.now)
        self.state[view_id] = replace(view, loaded=(*view.loaded, info))
        self.loading.add(view_id)
        self.actions.append(Action("load", view_id, model, reason))

    def idle_unloads(self, idle_unload_seconds: float) -> None:
        """Rule 1: models nobody uses or waits for, idle this long (preloads stay)."""
        for view in list(self.state.values()):
            if not _reachable(view):
                continue
            for info in sorted(view.loaded, key=lambda i: (i.last_used, i.model)):
                idle_for = self.now - info.last_used
                if (
                    info.active <= 0
                    and info.model not in self.wanted
                    and info.model not in view.preload
                    and idle_for >= idle_unload_seconds
                ):
                    self.unload(view.id, info.model, f"idle for {idle_for:.0f}s")

    def demand_loads(self, scale_out_queue_length: int) -> None:
        """Rule 2: queued models that no instance serves, or too few do; longest queue first."""
        for model in sorted(self.wanted, key=lambda m: (-self.demand[m], m)):
            queued = self.demand[model]
            hosts = [v.id for v in self.state.values() if _open(v) and v.has_loaded(model)]
            if not hosts:
                reason = f"{queued} queued, not loaded on any healthy instance"
            elif scale_out_queue_length > 0 and queued >= scale_out_queue_length * len(hosts):
                reason = f"{queued} queued, {len(hosts)} instance(s) serving it: scale out"
            else:
                continue
            options = self.targets(model)
            if options:
                _, view_id, evict = options[0]
                self.load(view_id, model, evict, reason)

    def targets(self, model: str) -> list[tuple[tuple[float, ...], str, list[str]]]:
        """Instances that could load the model now, cheapest first."""
        size = self.sizes.get(model, 0)
        options: list[tuple[tuple[float, ...], str, list[str]]] = []
        for view in self.state.values():
            if (
                not _open(view)
                or view.id in self.loading
                or view.has_loaded(model)
                or not serves(view, model)
            ):
                continue
            evict = evictions_to_fit(
                view, size, self.now, protect=self.wanted, min_idle_seconds=self.min_idle_seconds
            )
            if evict is None:
                continue
            budget = view.memory_budget_bytes
            free_after = float("inf") if budget <= 0 else budget - view.used_bytes - size
            evicted_bytes = sum(i.size_bytes for i in view.loaded if i.model in evict)
            busy = sum(i.active for i in view.loaded)
            cost = (float(len(evict)), float(busy), -(free_after + evicted_bytes))
            options.append((cost, view.id, evict))
        options.sort(key=lambda o: (o[0], o[1]))
        return options

    def preloads(self) -> None:
        """Rule 3: a preloaded model missing on its instance (one load per instance)."""
        for view in list(self.state.values()):
            if not _open(view) or view.id in self.loading:
                continue
            for model in sorted(view.preload):
                current = self.state[view.id]
                if current.has_loaded(model) or not serves(current, model):
                    continue
                victims = evictions_to_fit(
                    current,
                    self.sizes.get(model, 0),
                    self.now,
                    protect=self.wanted | current.preload,
                    min_idle_seconds=self.min_idle_seconds,
                )
                if victims is not None:
                    self.load(view.id, model, victims, "preload")
                    break


def _reachable(view: InstanceView) -> bool:
    """Ours to place models on: healthy, and not an external provider."""
    return view.healthy and not view.external


def _open(view: InstanceView) -> bool:
    """Reachable and taking new models (not draining)."""
    return _reachable(view) and not view.draining
