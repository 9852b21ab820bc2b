"""How many dispatch loops a fleet's slots need: one loop in EXTERNAL_LOOP_EVERY runs the
external provider's requests, the others the local fleet's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.scheduler.dispatcher import EXTERNAL_LOOP_EVERY, loops_for_slots


def _split(loops: int) -> tuple[int, int]:
    external = sum(i % EXTERNAL_LOOP_EVERY == EXTERNAL_LOOP_EVERY - 1 for i in range(loops))
    return loops - external, external


@given(st.integers(0, 2000), st.integers(0, 200))
def test_the_fewest_loops_that_cover_every_slot(local: int, external: int) -> None:
    loops = loops_for_slots(local, external)
    has_local, has_external = _split(loops)
    assert has_local >= local and has_external >= external
    if loops:
        fewer_local, fewer_external = _split(loops - 1)
        assert fewer_local < local or fewer_external < external


def test_a_local_fleet_of_24_slots_needs_27_loops() -> None:
    assert loops_for_slots(24, 0) == 27
    assert loops_for_slots(0, 2) == 2 * EXTERNAL_LOOP_EVERY
