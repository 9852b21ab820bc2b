"""Shared fixtures for the Pool tests.

Upstream adapters (``test_upstream.py``): ``upstream_emulator_config`` builds a
fast emulator config, ``upstream_emulator`` runs one instance on a free port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from usher.emulator import EmulatorConfig, EmulatorServer, model_spec

#: Models every upstream emulator offers: two chat models and an embedding model.
UPSTREAM_EMULATOR_MODELS = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text")


def fast_emulator_config(**overrides: Any) -> EmulatorConfig:
    """Instant tokens, tiny load time: each request takes milliseconds."""
    base: dict[str, Any] = {
        "models": [model_spec(name) for name in UPSTREAM_EMULATOR_MODELS],
        "load_time": 0.01,
        "time_to_first_token": 0.0,
        "tokens_per_second": 0,
        "output_tokens": (8, 24),
    }
    base.update(overrides)
    return EmulatorConfig(**base)


@pytest.fixture
def upstream_emulator_config() -> Callable[..., EmulatorConfig]:
    """Factory for fast emulator configs (keyword overrides of ``EmulatorConfig``)."""
    return fast_emulator_config


@pytest.fixture
async def upstream_emulator() -> AsyncIterator[EmulatorServer]:
    """One fast emulated Ollama instance (native and /v1 API) on a free port."""
    async with EmulatorServer(fast_emulator_config()) as server:
        yield server
