"""Fixtures: fast emulator configs and in-process instances."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from usher.emulator import EmulatorServer

from .helpers import fast_config


@pytest.fixture
def make_server() -> Callable[..., EmulatorServer]:
    """Factory; servers it creates are not started (use ``async with``)."""

    def make(**overrides: Any) -> EmulatorServer:
        return EmulatorServer(fast_config(**overrides))

    return make


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorServer]:
    async with EmulatorServer(fast_config()) as server:
        yield server


@pytest.fixture
async def client(emulator: EmulatorServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=10) as c:
        yield c
