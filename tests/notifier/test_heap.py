"""The heap freezer: survivors leave the collector's walks; a sweep still frees cycles."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from services.notifier.heap import HeapFreezer


@pytest.fixture(autouse=True)
def _unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_survivors_are_frozen_and_a_sweep_frees_cycles_among_them() -> None:
    heap = HeapFreezer()
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle, alive for now
    heap.freeze()
    assert gc.get_freeze_count() > 0
    del a, b  # now garbage, but frozen: ordinary collections do not see it
    assert not any(isinstance(o, Node) for o in gc.get_objects())
    assert heap.sweep() >= 2
    assert heap.sweeps == 1 and gc.get_freeze_count() > 0


def test_a_sweep_is_due_when_the_frozen_heap_doubled_or_after_long() -> None:
    heap = HeapFreezer(min_sweep_seconds=60, max_sweep_seconds=3600, min_baseline=1)
    heap.sweep()  # the baseline: what is alive now
    now = heap._last_sweep
    assert not heap.sweep_due(now + 30)
    assert not heap.sweep_due(now + 120)  # it has not grown
    assert heap.sweep_due(now + 3601)
    heap._baseline = gc.get_freeze_count() // 3  # as if the heap had tripled since
    assert not heap.sweep_due(now + 30)  # grown, but the last sweep was recent
    assert heap.sweep_due(now + 120)


async def test_run_freezes_until_stopped_then_unfreezes() -> None:
    heap = HeapFreezer(freeze_seconds=0.01)
    stop = asyncio.Event()
    task = asyncio.ensure_future(heap.run(stop))
    await asyncio.sleep(0.05)
    assert gc.get_freeze_count() > 0
    stop.set()
    await asyncio.wait_for(task, 1)
    assert gc.get_freeze_count() == 0


async def test_zero_leaves_the_collector_alone() -> None:
    await asyncio.wait_for(HeapFreezer(freeze_seconds=0).run(asyncio.Event()), 1)
    assert gc.get_freeze_count() == 0
