"""Run a process's main coroutine on uvloop when it is installed.

Every Usher process is an asyncio program whose CPU goes mostly to per-message work in the
event loop (gRPC callbacks, Redis replies, socket writes); uvloop's libuv loop does that
work in C and cuts each service's CPU per request by about a quarter (``python -m bench
overhead``). ``USHER_EVENT_LOOP=asyncio`` keeps the standard loop, e.g. for debugging.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default."""
    if os.environ.get("USHER_EVENT_LOOP", "uvloop") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not on every platform (Windows): the standard loop works too
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the chosen loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
