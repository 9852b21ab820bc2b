"""The final update of a finished request asked of the trio's Notifier process two ways, a
unary ``AwaitResult`` and a final-only ``Watch`` (a stream of one message), in rounds that
alternate; CPU per call of the Notifier process and of this client process (its gRPC
client, as the gateway's and the SDK's). Requests are finished first, so both ways take
the same path in the Notifier (the snapshot of an ended request) and differ by the call's
shape alone. Not a scenario of the suite: run it on its own.

``python -m bench.await_harness [CALLS ROUNDS]`` (defaults 2000 6) prints the medians in
microseconds per call, concurrency 16."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import grpc

from bench.load import MODEL, cpu_seconds, stack_pids
from bench.overhead_bench import stack_config
from clients.aio import AsyncUsherClient
from usher import eventloop
from usher.testing.stack import LocalStack
from usher.v1 import notifier_pb2, notifier_pb2_grpc

__all__ = ["main"]

CONCURRENCY = 16
_METADATA = (("authorization", "Bearer alice-token"),)
Call = Callable[[int], Awaitable[None]]


async def _per_call(call: Call, calls: int, notifier_pid: int) -> tuple[float, float]:
    """CPU microseconds per call of the Notifier and of this process over ``calls`` calls."""
    numbers = iter(range(calls))

    async def worker() -> None:
        for n in numbers:
            await call(n)

    notifier, client = cpu_seconds(notifier_pid), time.process_time()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return (
        (cpu_seconds(notifier_pid) - notifier) * 1e6 / calls,
        (time.process_time() - client) * 1e6 / calls,
    )


async def main(calls: int, rounds: int) -> None:
    with LocalStack(stack_config()) as stack:
        async with AsyncUsherClient(
            stack.scheduler_address, stack.notifier_address, token="alice-token"
        ) as sdk:
            finished = await asyncio.gather(
                *(sdk.submit_and_wait(MODEL, f"request {n}") for n in range(64))
            )
        requests = [(r.id, r.model) for r in finished]
        notifier_pid = stack_pids(stack)["notifier"]
        channel = grpc.aio.insecure_channel(stack.notifier_address)
        stub = notifier_pb2_grpc.NotifierServiceStub(channel)

        async def awaited(n: int) -> None:
            request_id, model = requests[n % len(requests)]
            await stub.AwaitResult(
                notifier_pb2.AwaitResultRequest(id=request_id, model=model), metadata=_METADATA
            )

        async def watched(n: int) -> None:
            request_id, model = requests[n % len(requests)]
            watch = notifier_pb2.WatchRequest(id=request_id, model=model, final_only=True)
            async for _ in stub.Watch(watch, metadata=_METADATA):
                pass

        ways: dict[str, Call] = {"AwaitResult": awaited, "Watch final_only": watched}
        for call in ways.values():  # warm up
            await _per_call(call, calls // 4, notifier_pid)
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
        for n in range(rounds):
            for name in list(ways) if n % 2 == 0 else list(reversed(ways)):
                rows[name].append(await _per_call(ways[name], calls, notifier_pid))
        for name, got in rows.items():
            notifier = statistics.median(g[0] for g in got)
            client = statistics.median(g[1] for g in got)
            print(
                f"{name}: Notifier {notifier:.0f} us per call, client {client:.0f}, "
                f"together {notifier + client:.0f} (medians of {rounds} rounds of {calls})"
            )
        await channel.close()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    defaults = [2000, 6]
    calls, rounds = args + defaults[len(args) :]
    eventloop.run(main(calls, rounds))
