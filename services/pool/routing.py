"""Which instance runs a request for a model, as pure functions over a snapshot.

The Pool describes every instance as a ``Candidate`` for the model at hand (health,
circuits, slots, what is loaded, recent latency) and asks ``rank`` for an order, best
first; it tries them in that order, so a failure before the first token moves on to the
next. Only eligible candidates are ranked: never an unhealthy, circuit-open or draining
instance, one without a free slot, or one that would have to evict a busy model to load.

Strategies:

* ``affinity`` (default): loads cost seconds (a 70B model can take a minute), so an
  instance that has the model loaded with the right context size always beats one that
  would have to load it, however busy, as long as it has a free slot. Within that tier the
  least outstanding work per unit of weight wins, ``(active + 1) / weight`` (the instance's
  share once this request lands, so idle instances still differ by weight), made worse by
  recent errors and by latency above the fastest candidate's. A reload (different
  ``num_ctx``) of a model nobody is using here costs about a load; one that would stall
  running requests ranks last.
* ``weighted_round_robin``: stride scheduling, i.e. smooth weighted round robin without
  state. Instance *i*'s *k*-th turn falls at virtual time ``(k + 1/2) / weight_i``; decision
  number ``rotation`` takes the ``rotation``-th turn of the merged sequence. Over any run of
  rotations each instance's share is within about one turn of ``weight_i / sum(weights)``,
  and turns interleave rather than come in bursts. The caller keeps the counter (per model).
* ``least_connections``: fewest requests in flight per unit of weight.
* ``latency``: lowest recent latency (EWMA) * (1 + error rate); an instance with no
  latency yet counts as fastest, so a new instance gets tried.

Ties go to the higher weight, then the smaller id, so every decision is reproducible. A
decision is O(n log n) over plain tuples: well under a millisecond for twenty candidates.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ERROR_PENALTY",
    "LATENCY_PENALTY",
    "MAX_LATENCY_EXCESS",
    "Candidate",
    "Strategy",
    "choose",
    "eligible",
    "rank",
]

#: An instance failing every request counts as (1 + this) times as loaded.
ERROR_PENALTY = 4.0
#: Each multiple of the fastest candidate's latency counts as this much extra load.
LATENCY_PENALTY = 0.5
#: Latency excess beyond this many multiples of the fastest is not penalised further.
MAX_LATENCY_EXCESS = 4.0


class Strategy(enum.StrEnum):
    AFFINITY = "affinity"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_CONNECTIONS = "least_connections"
    LATENCY = "latency"

    @classmethod
    def parse(cls, name: str) -> Strategy:
        """A strategy by name, case- and dash-insensitive, with a few common aliases."""
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        try:
            return cls(key)
        except ValueError:
            valid = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown routing strategy {name!r} (one of {valid})") from None


_ALIASES = {
    "wrr": "weighted_round_robin",
    "round_robin": "weighted_round_robin",
    "least_conn": "least_connections",
    "lc": "least_connections",
    "fastest": "latency",
}


@dataclass(frozen=True, slots=True)
class Candidate:
    """One instance as seen for one request's model at decision time."""

    instance: str
    weight: float = 1.0
    healthy: bool = True
    #: Both the instance's and the (instance, model) circuit would admit a call.
    circuit_allows: bool = True
    draining: bool = False
    #: The model is available here (pulled) and allowed by the instance's config.
    serves_model: bool = True
    model_loaded: bool = False
    #: Loaded, but with another ``num_ctx``: running the request forces a reload.
    needs_reload: bool = False
    #: Slots free for this model here (``parallel`` minus its requests running here).
    free_slots: int = 1
    #: Requests running here now, all models.
    active: int = 0
    parallel: int = 1
    #: Recent latency (EWMA, seconds); 0 when unknown.
    latency_seconds: float = 0.0
    #: Recent share of failed requests, 0..1.
    error_rate: float = 0.0
    #: The model fits (memory, max loaded models) without evicting a busy model.
    can_load: bool = True
    external: bool = False

    @property
    def warm(self) -> bool:
        """Runs the request without loading anything."""
        return self.model_loaded and not self.needs_reload


def eligible(c: Candidate) -> bool:
    """May this instance take the request now? (Weight 0 means: send it nothing.)"""
    return (
        c.healthy
        and c.circuit_allows
        and not c.draining
        and c.serves_model
        and c.free_slots > 0
        and c.weight > 0
        and (c.model_loaded or c.can_load)
    )


def rank(
    candidates: Iterable[Candidate],
    strategy: Strategy | str = Strategy.AFFINITY,
    *,
    rotation: int = 0,
    external: bool | None = False,
) -> list[Candidate]:
    """Eligible candidates, best first.

    ``rotation`` drives weighted round robin (the caller's decision counter, ≥ 0; ignored
    by the other strategies). ``external`` keeps only the local fleet (False, the default),
    only external providers (True, for requests handed to the external lane) or both (None).
    """
    strategy = strategy if isinstance(strategy, Strategy) else Strategy.parse(strategy)
    pool = [c for c in candidates if eligible(c) and (external is None or c.external == external)]
    if len(pool) <= 1:
        return pool
    # One deterministic base order, so every tie below falls to weight, then id.
    pool.sort(key=lambda c: (-c.weight, c.instance))
    if strategy is Strategy.WEIGHTED_ROUND_ROBIN:
        return _stride_order(pool, rotation)
    key: Callable[[Candidate], tuple[float, ...]]
    if strategy is Strategy.AFFINITY:
        key = _affinity_key(pool)
    elif strategy is Strategy.LEAST_CONNECTIONS:
        key = _least_connections_key
    else:
        key = _latency_key
    return sorted(pool, key=key)  # stable: equal keys keep the base order


def choose(
    candidates: Iterable[Candidate],
    strategy: Strategy | str = Strategy.AFFINITY,
    *,
    rotation: int = 0,
    external: bool | None = False,
) -> Candidate | None:
    """The best eligible candidate, or None when no instance can take the request now."""
    ranked = rank(candidates, strategy, rotation=rotation, external=external)
    return ranked[0] if ranked else None


def _busy_slots(c: Candidate) -> float:
    return max(0, c.parallel - c.free_slots) / c.weight


def _tier(c: Candidate) -> int:
    if c.warm:
        return 0
    if not c.model_loaded or c.free_slots >= c.parallel:
        return 1  # a load, or a reload of a model idle here
    return 2  # a reload that would wait for (or stall) requests running on the model


def _affinity_key(pool: Sequence[Candidate]) -> Callable[[Candidate], tuple[float, ...]]:
    known = [c.latency_seconds for c in pool if c.latency_seconds > 0]
    fastest = min(known) if known else 0.0

    def key(c: Candidate) -> tuple[float, ...]:
        penalty = 1.0 + ERROR_PENALTY * min(1.0, max(0.0, c.error_rate))
        if fastest > 0 and c.latency_seconds > fastest:
            excess = min(MAX_LATENCY_EXCESS, c.latency_seconds / fastest - 1.0)
            penalty *= 1.0 + LATENCY_PENALTY * excess
        return (_tier(c), (c.active + 1) / c.weight * penalty, _busy_slots(c))

    return key


def _least_connections_key(c: Candidate) -> tuple[float, ...]:
    return (c.active / c.weight, _busy_slots(c))


def _latency_key(c: Candidate) -> tuple[float, ...]:
    error = min(1.0, max(0.0, c.error_rate))
    return (c.latency_seconds * (1.0 + error), c.active / c.weight)


def _stride_order(pool: Sequence[Candidate], rotation: int) -> list[Candidate]:
    """Candidates in the order of their next turn at or after turn number ``rotation``.

    Turn (i, k) falls at ``(2k + 1) / (2 w_i)``. Fewer than ``t·W + n/2`` turns fall before
    virtual time t (W = sum of weights), so turn number r lies in a window of a few n turns
    around ``r / W``: enumerate just that window (with a turn of margin each side for
    rounding), count the turns before it exactly, and index into the sorted window.
    Equal rational times give equal floats (one correctly rounded division each), so ties
    are exact and fall to the base order.
    """
    if rotation < 0:
        raise ValueError("rotation must be non-negative")
    n = len(pool)
    total = math.fsum(c.weight for c in pool)
    t_lo = (rotation - n - 1) / total
    t_hi = (rotation + n + 2) / total
    before = 0
    turns: list[tuple[float, int]] = []
    for index, c in enumerate(pool):
        w = c.weight
        k_lo = max(0, math.floor(t_lo * w - 0.5) - 1)
        k_hi = max(k_lo, math.ceil(t_hi * w + 0.5) + 1)
        before += k_lo
        turns.extend(((2 * k + 1) / (2 * w), index) for k in range(k_lo, k_hi + 1))
    turns.sort()
    order: list[Candidate] = []
    seen: set[int] = set()
    for _, index in turns[rotation - before :]:
        if index not in seen:
            seen.add(index)
            order.append(pool[index])
            if len(order) == n:
                break
    return order
