"""The Pool's relay of a streamed answer in one process, without timing: CPU per token of
Reserve + Generate through the in-process channel (as ``usher serve``'s dispatchers call
them), each answer consumed as the dispatcher does, its model server a task feeding NDJSON
lines into an aiohttp ``StreamReader`` LINES at a time per turn of the loop (no socket, no
clock: the same reads and messages on every run, so two trees compare on a loaded machine).
The Pool's message coalescing is off (a message per read, as at 50 tokens/s). Redis is a
real one (the slots). Not a scenario of the suite: run it alone, alternated between trees
(``PYTHONPATH=<tree>``), and compare medians.

``python -m bench.relay_harness [STREAMS TOKENS ROUNDS LINES]`` (defaults 200 200 3 1)
prints the CPU microseconds per token of each round and the messages per round."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

import services.pool.service as pool_service
from bench.load import MODEL
from services.pool.app import PoolApp
from services.pool.settings import load_pool_settings
from services.pool.upstream import UpstreamResponse
from services.pool.upstream_ollama import OllamaUpstream
from usher import eventloop
from usher.inprocess import LocalChannel
from usher.structs import duration_from_seconds
from usher.testing.processes import free_port
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import pool_pb2, pool_pb2_grpc, request_pb2

__all__ = ["main"]

_STAMP = "2026-12-06T19:00:00.000000Z"


class _Transport:
    """What an aiohttp StreamReader asks of its protocol (flow control: nothing to do)."""

    _reading_paused = False
    connected = True

    def pause_reading(self, *_: Any, **__: Any) -> None:
        return None

    def resume_reading(self, *_: Any, **__: Any) -> None:
        return None


class _Answer:
    """Stands for the aiohttp response whose body the reader holds."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.connection = None
        self.status = 200

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


class _FedOllama(OllamaUpstream):
    """An Ollama whose answers are fed by a task: ``lines`` token lines per loop turn."""

    def __init__(self, base_url: str, tokens: int, lines: int) -> None:
        super().__init__(base_url)
        self._tokens = tokens
        self._lines = lines
        self._feeders: set[asyncio.Task[None]] = set()
        token = {"model": MODEL, "created_at": _STAMP, "response": " word", "done": False}
        self._token_line = json.dumps(token).encode() + b"\n"
        done = {
            "model": MODEL,
            "created_at": _STAMP,
            "response": "",
            "done": True,
            "done_reason": "stop",
            "eval_count": tokens,
            "eval_duration": 1_000_000,
        }
        self._done_line = json.dumps(done).encode() + b"\n"

    async def health(self) -> None:
        return None

    async def open_stream(self, path: str, body: Any, *, traceparent: str = "") -> UpstreamResponse:
        loop = asyncio.get_running_loop()
        reader = aiohttp.StreamReader(_Transport(), 2**16, loop=loop)  # type: ignore[arg-type]
        feeder = loop.create_task(self._feed(reader))
        self._feeders.add(feeder)
        feeder.add_done_callback(self._feeders.discard)
        return UpstreamResponse(_Answer(reader))  # type: ignore[arg-type]

    async def _feed(self, reader: aiohttp.StreamReader) -> None:
        for index in range(self._tokens):
            if index % self._lines == 0:
                await asyncio.sleep(0)
            reader.feed_data(self._token_line)
        await asyncio.sleep(0)
        reader.feed_data(self._done_line)
        reader.feed_eof()


async def _stream(
    pool: pool_pb2_grpc.PoolServiceAsyncStub,
    metadata: tuple[tuple[str, str], ...],
    number: int,
    counts: list[int],
) -> None:
    reserved = await pool.Reserve(
        pool_pb2.ReserveRequest(
            models=[MODEL],
            holder="harness",
            route=request_pb2.ROUTE_LOCAL,
            wait=duration_from_seconds(5),
        ),
        metadata=metadata,
    )
    request = pool_pb2.GenerateRequest(
        slot_id=reserved.slot.id, request_id=f"r{number}", model=MODEL, stream=True
    )
    request.generate.prompt = f"stream {number}"
    async for reply in pool.Generate(request, metadata=metadata):
        which = reply.WhichOneof("event")
        if which == "delta":
            counts[0] += 1
        elif which == "done":
            counts[1] += reply.done.usage.completion_tokens
            break


async def main(streams: int, tokens: int, rounds: int, lines: int) -> None:
    pool_service.COALESCE_SECONDS = 0.0  # a message per read, as at 50 tokens/s
    config = StackConfig(
        emulator_args=("--parallel", str(streams)),
        model_server_processes=2,
        instance_options=f";parallel={streams}",
    )
    stack = LocalStack(config)
    stack.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        stack._start_redis()
        stack.start_model_servers()
        env = {
            **stack._common(),
            **stack._fleet_env(),
            "USHER_POOL_LISTEN": f"127.0.0.1:{free_port()}",
            "USHER_LOG_LEVEL": "warning",
        }
        app = PoolApp(load_pool_settings(env))
        await app.start()
        for state in app.registry.instances.values():
            await state.upstream.aclose()
            state.upstream = _FedOllama(state.upstream.base_url, tokens, lines)
        local = LocalChannel.serving(app.registrations).as_channel()
        pool: pool_pb2_grpc.PoolServiceAsyncStub = pool_pb2_grpc.PoolServiceStub(local)
        metadata = (("authorization", f"Bearer {config.service_token}"),)
        await asyncio.gather(*(_stream(pool, metadata, n, [0, 0]) for n in range(4)))
        per_token = []
        counts = [0, 0]
        for _ in range(rounds):
            counts = [0, 0]
            cpu = time.process_time()
            await asyncio.gather(*(_stream(pool, metadata, n, counts) for n in range(streams)))
            per_token.append((time.process_time() - cpu) * 1e6 / max(1, counts[1]))
        print(
            "cpu us per token " + " ".join(f"{x:.2f}" for x in per_token),
            f"messages per round {counts[0]}",
            flush=True,
        )
        await app.stop()
    finally:
        stack.stop()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:5]]
    defaults = [200, 200, 3, 1]
    streams, tokens, rounds, lines = args + defaults[len(args) :]
    eventloop.run(main(streams, tokens, rounds, lines))
