"""A real model: llama.cpp (llama-cpp-python) serving SmolLM2-135M, called directly through
its OpenAI-compatible API and through Usher (SDK → Scheduler → Pool → llama.cpp, tokens back
through the Notifier). Time to first token and tokens/s, one request at a time; plot in
bench/results/real.png. Skipped (a summary saying why) when llama-cpp-python or the model
package is not installed."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from bench import plots
from bench.stats import percentile
from clients.aio import AsyncUsherClient
from usher.testing.llamacpp import LlamaServerError, running_llama_server
from usher.testing.stack import LocalStack, StackConfig

PROMPTS = [f"Write two sentences about the number {n}." for n in range(12)]
MAX_TOKENS = 48


async def _direct(url: str, model: str, prompt: str) -> tuple[float, float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply,
    ):
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                tokens += 1
                first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, tokens


async def _through_usher(
    client: AsyncUsherClient, model: str, prompt: str
) -> tuple[float, float, int]:
    started = time.perf_counter()
    first = 0.0
    pieces = 0
    async for text in client.stream_tokens(model, prompt, num_predict=MAX_TOKENS, temperature=0):
        if text:
            pieces += 1
            first = first or time.perf_counter() - started
    return first, time.perf_counter() - started, pieces


#: (time to first token, total, tokens) of one request, seconds.
Run = tuple[float, float, int]


async def measure() -> tuple[float, list[Run], list[Run]]:
    """Server start-up seconds, then each prompt directly and each through Usher."""
    # llama-cpp-python interrupts a streaming answer when any other request arrives (the
    # Pool's health checks too) unless told not to.
    with running_llama_server(
        alias="smollm2", extra_args=("--interrupt_requests", "False")
    ) as server:
        config = StackConfig(ollama_urls=[server.url], instance_options=";kind=openai;parallel=1")
        with LocalStack(config) as stack:
            client = AsyncUsherClient(
                stack.scheduler_address, stack.notifier_address, token="alice-token"
            )
            await _direct(server.url, server.model, "warm up")
            await _through_usher(client, server.model, "warm up")
            direct = [await _direct(server.url, server.model, p) for p in PROMPTS]
            usher = [await _through_usher(client, server.model, p) for p in PROMPTS]
            await client.close()
    return server.startup_seconds, direct, usher


async def run() -> dict[str, Any]:
    try:
        startup, direct, usher = await measure()
    except LlamaServerError as exc:
        return {"skipped": str(exc)}
    # Greedy decoding of the same prompts: both paths produce the same tokens, so the
    # direct path's counts serve for both (Usher's stream arrives in batches of text).
    tokens = [n for _, _, n in direct]
    paths = {"direct": direct, "usher": usher}
    rates = {
        name: [n / total for n, (_, total, _) in zip(tokens, runs, strict=True)]
        for name, runs in paths.items()
    }
    summary: dict[str, Any] = {"requests": len(PROMPTS), "server_startup_s": startup}
    for name, runs in paths.items():
        ttft = [first for first, _, _ in runs]
        summary[name] = {
            "ttft_p50_ms": percentile(ttft, 50) * 1000,
            "ttft_p90_ms": percentile(ttft, 90) * 1000,
            "total_p50_ms": percentile([total for _, total, _ in runs], 50) * 1000,
            "tokens_per_second": sum(tokens) / sum(total for _, total, _ in runs),
        }
    summary["added_ttft_p50_ms"] = (
        summary["usher"]["ttft_p50_ms"] - summary["direct"]["ttft_p50_ms"]
    )
    summary["usher_over_direct_tokens_per_second"] = (
        summary["usher"]["tokens_per_second"] / summary["direct"]["tokens_per_second"]
    )
    summary["note"] = (
        "SmolLM2-135M Q4_1 on the machine's CPU cores, greedy, 48 tokens at most; usher = from "
        "SDK submit to the last token through Scheduler, Pool and Notifier"
    )
    saved: list[str] = []
    _plot(paths, rates, saved)
    summary["plots"] = saved
    return summary


def _plot(paths: dict[str, list[Run]], rates: dict[str, list[float]], saved: list[str]) -> None:
    """Time to first token and tokens/s per request, direct vs through Usher."""
    names = list(paths)
    with plots.figure(
        "real",
        1,
        2,
        size=(12, 4.5),
        title=f"A real model (SmolLM2-135M, llama.cpp), {len(PROMPTS)} requests each way",
        saved=saved,
    ) as (ttft, speed):
        ttft.boxplot([[first * 1000 for first, _, _ in paths[n]] for n in names], showmeans=True)
        ttft.set_xticks(range(1, len(names) + 1), names)
        ttft.set_ylabel("time to first token (ms)")
        ttft.set_title("time to first token")
        speed.boxplot([rates[n] for n in names], showmeans=True)
        speed.set_xticks(range(1, len(names) + 1), names)
        speed.set_ylabel("tokens/s (per request)")
        speed.set_title("generation speed, submit to last token")
        for axis in (ttft, speed):
            axis.plot([], [], "^", color="tab:green", label="mean")
            axis.plot([], [], "-", color="tab:orange", label="median (box: quartiles)")
            axis.legend(fontsize=8)
