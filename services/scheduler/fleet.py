"""How many dispatch loops a replica runs: one per slot of the fleet it dispatches to.

A loop runs one request at a time, so a replica with fewer loops than its fleet has slots
leaves slots idle while requests wait. Unless ``USHER_DISPATCH_CONCURRENCY`` fixes the
number, the dispatcher asks the Pool for its instances now and then and keeps a loop for
each slot (``loops_for_fleet``): the fleet may grow at run time (RegisterInstance, a model
loaded beside another). Loops beyond the work are cheap: they sleep until work wakes one,
and only as many reserve slots as there are requests queued.
"""

from __future__ import annotations

from collections.abc import Iterable

from usher.v1 import pool_pb2

__all__ = [
    "DEFAULT_LOOPS",
    "EXTERNAL_LOOP_EVERY",
    "MAX_LOOPS",
    "external_loop",
    "fleet_slots",
    "loops_for_fleet",
    "loops_for_slots",
]

#: One loop in this many runs requests routed to the external provider; the others run
#: those of the local fleet.
EXTERNAL_LOOP_EVERY = 8
#: Loops of a replica following its fleet: at least this many (a fleet not listed yet, or
#: a small one), at most MAX_LOOPS.
DEFAULT_LOOPS = 16
MAX_LOOPS = 1024


def external_loop(index: int) -> bool:
    """Whether the loop of this index runs the external provider's requests (of the first
    ``n`` loops, ``n // EXTERNAL_LOOP_EVERY`` do)."""
    return index % EXTERNAL_LOOP_EVERY == EXTERNAL_LOOP_EVERY - 1


def loops_for_slots(local: int, external: int) -> int:
    """The fewest loops with a loop for each of ``local`` slots of the local fleet and each
    of ``external`` slots of the external provider."""
    loops = max(local, external * EXTERNAL_LOOP_EVERY)  # fewer can't have either
    while loops - loops // EXTERNAL_LOOP_EVERY < local:
        loops += 1
    return loops


def fleet_slots(instances: Iterable[pool_pb2.InstanceStatus]) -> tuple[int, int]:
    """Generations the fleet runs at once, on local instances and on the external
    provider: each instance's ``parallel`` times ``max_loaded_models`` where that is set,
    else times the models it has loaded now (at least one). Draining instances take no new
    work and don't count."""
    local = external = 0
    for status in instances:
        if status.draining:
            continue
        models = status.config.max_loaded_models or len(status.loaded)
        slots = max(1, status.parallel) * max(1, models)
        if status.config.external:
            external += slots
        else:
            local += slots
    return local, external


def loops_for_fleet(instances: Iterable[pool_pb2.InstanceStatus]) -> int:
    """The loops that cover every slot of the fleet, between DEFAULT_LOOPS and MAX_LOOPS."""
    return min(MAX_LOOPS, max(DEFAULT_LOOPS, loops_for_slots(*fleet_slots(instances))))
