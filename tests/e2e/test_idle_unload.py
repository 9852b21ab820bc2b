"""Idle unload by Usher's own TTL through real processes: every call carries a keep_alive
longer than Usher's idle unload (so the model server never unloads first), Usher's
placement unloads the idle model, and a preloaded model stays loaded for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from clients.aio import AsyncUsherClient
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
IDLE_UNLOAD = 4.0
INTERVAL = 0.5


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            (
                # The model server's own default keep-alive is short: 2 s.
                ("--instant", "--keep-alive", "2s", "--models", "llama3.2:1b,qwen2.5:0.5b"),
                ";parallel=2;preload=qwen2.5:0.5b",
            ),
        ),
        pool_env={
            "USHER_POOL_IDLE_UNLOAD_SECONDS": str(IDLE_UNLOAD),
            "USHER_POOL_PLACEMENT_INTERVAL_SECONDS": str(INTERVAL),
        },
        log_level="info",
    )
    with LocalStack(config) as running:
        yield running


async def loaded(url: str) -> dict[str, float]:
    """model → seconds until the model server's keep-alive would unload it."""
    async with httpx.AsyncClient() as http:
        models: list[dict[str, Any]] = (await http.get(f"{url}/api/ps")).json()["models"]
    now = time.time()
    return {m["name"]: datetime.fromisoformat(m["expires_at"]).timestamp() - now for m in models}


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        result: dict[str, Any] = (await http.get(f"{url}/_emulator/stats")).json()
        return result


async def test_usher_unloads_idle_models_before_the_model_server_would_and_keeps_preloads(
    stack: LocalStack,
) -> None:
    url = stack.model_urls[0]
    for _ in range(100):  # placement loads the preload at start
        if "qwen2.5:0.5b" in await loaded(url):
            break
        await asyncio.sleep(0.1)
    async with AsyncUsherClient(
        stack.scheduler_address, stack.notifier_address, token="alice-token"
    ) as client:
        await client.submit_and_wait("llama3.2:1b", "hello", wait_timeout=30)
        await client.submit_and_wait("qwen2.5:0.5b", "hello", wait_timeout=30)
    expiry = await loaded(url)
    # The call carried Usher's keep_alive (idle unload + two placement passes), not the
    # server's 2 s; the preload's (even after a request to it) is for ever.
    assert expiry["llama3.2:1b"] > IDLE_UNLOAD
    assert expiry["qwen2.5:0.5b"] > 365 * 86400
    for _ in range(200):
        if "llama3.2:1b" not in await loaded(url):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the idle model was never unloaded")
    log = (stack.state_dir / "pool.log").read_text().splitlines()
    assert any(  # Usher's doing, not the model server's timer
        '"action": "unload"' in line and '"model": "llama3.2:1b"' in line for line in log
    )
    await asyncio.sleep(1.0)
    assert "qwen2.5:0.5b" in await loaded(url)  # still warm, never reloaded
    assert (await stats(url))["models"]["qwen2.5:0.5b"]["loads"] == 1
