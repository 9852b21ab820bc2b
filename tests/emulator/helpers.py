"""Shared helpers for the emulator tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx

from usher.emulator import EmulatorConfig, ModelSpec, model_spec

__all__ = ["GiB", "fast_config", "gib_models", "ndjson", "wait_until"]

GiB = 1024**3


def fast_config(**overrides: Any) -> EmulatorConfig:
    """A config that makes every test quick: tiny load time, instant tokens."""
    base: dict[str, Any] = {
        "models": [
            model_spec("llama3.2:1b"),
            model_spec("qwen2.5:0.5b"),
            model_spec("nomic-embed-text"),
        ],
        "load_time": 0.02,
        "time_to_first_token": 0.0,
        "tokens_per_second": 0,
        "output_tokens": (8, 24),
    }
    base.update(overrides)
    return EmulatorConfig(**base)


def gib_models(*names: str, size: float = 1.0) -> list[ModelSpec]:
    """Models of ``size`` GiB each, for memory-budget arithmetic."""
    return [ModelSpec(name=n, size=int(size * GiB)) for n in names]


def ndjson(resp: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a condition on emulator state (stats are plain attributes, no events)."""
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached in time")
