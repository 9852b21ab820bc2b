"""A real model: llama.cpp (llama-cpp-python) serving SmolLM2-135M, called directly through
its OpenAI-compatible API and through Usher (SDK → Scheduler → Pool → llama.cpp, tokens back
through the Notifier). Time to first token and tokens/s, one request at a time."""

from __future__ import annotations

import json
import time

import httpx

from bench.stats import emit, percentile
from clients.aio import AsyncUsherClient
from usher.testing.llamacpp import running_llama_server
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


async def run() -> None:
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
    # Greedy decoding of the same prompts: both paths produce the same tokens, so the
    # direct path's counts serve for both (Usher's stream arrives in batches of text).
    tokens = sum(n for _, _, n in direct)
    for name, runs in (("direct", direct), ("usher", usher)):
        ttft = [first for first, _, _ in runs]
        emit(
            "real.llama_cpp",
            path=name,
            requests=len(runs),
            server_startup_s=server.startup_seconds,
            ttft_p50_ms=percentile(ttft, 50) * 1000,
            ttft_p90_ms=percentile(ttft, 90) * 1000,
            total_p50_ms=percentile([total for _, total, _ in runs], 50) * 1000,
            tokens_per_second=tokens / sum(total for _, total, _ in runs),
            note="SmolLM2-135M Q4_1 on 2 CPU cores, greedy, 48 tokens at most; usher = from SDK "
            "submit to the last token through Scheduler, Pool and Notifier",
        )
