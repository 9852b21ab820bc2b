"""The CLI in a subprocess: it prints its URLs, serves, and can be killed or
crashed from outside like a real Ollama process."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from usher.emulator import CRASH_EXIT_CODE, EmulatorProcess

from .helpers import fast_config

pytestmark = pytest.mark.slow


async def test_cli_process_sigkill_drops_connections() -> None:
    async with (
        EmulatorProcess(
            ["--models", "qwen2.5:0.5b", "--tokens-per-second", "40", "--load-time", "0.01"]
        ) as proc,
        httpx.AsyncClient(base_url=proc.url, timeout=5) as c,
    ):
        assert (await c.get("/")).text == "Ollama is running"
        tags = (await c.get("/api/tags")).json()
        assert [m["name"] for m in tags["models"]] == ["qwen2.5:0.5b"]

        async def stream() -> list[str]:
            lines = []
            async with c.stream(
                "POST", "/api/generate", json={"model": "qwen2.5:0.5b", "prompt": "x"}
            ) as resp:
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if len(lines) == 2:
                        proc.kill()  # SIGKILL mid-stream
            return lines

        with pytest.raises(httpx.TransportError):
            await stream()
        assert proc.returncode == -signal.SIGKILL
        with pytest.raises(httpx.ConnectError):
            await c.get("/")


async def test_cli_process_crash_fault_exits_and_config_file() -> None:
    config = fast_config(num_parallel=3)
    async with EmulatorProcess(config=config) as proc:
        async with httpx.AsyncClient(base_url=proc.url, timeout=5) as c:
            remote = (await c.get("/_emulator/config")).json()
            assert remote["num_parallel"] == 3
            assert remote["tokens_per_second"] == 0
            r = await c.post("/_emulator/faults", json={"crash": True})
            assert r.status_code == 200
        assert await asyncio.to_thread(proc.wait, 5) == CRASH_EXIT_CODE


async def test_cli_fleet_prints_every_url() -> None:
    async with EmulatorProcess(["--fleet", "2", "--instant"]) as proc:
        assert len(proc.urls) == 2
        async with httpx.AsyncClient(timeout=5) as c:
            for url in proc.urls:
                r = await c.post(
                    url + "/api/generate",
                    json={"model": "llama3.2:1b", "prompt": "hi", "stream": False},
                )
                assert r.json()["done"] is True
    assert proc.returncode == 0  # SIGTERM is a clean shutdown
