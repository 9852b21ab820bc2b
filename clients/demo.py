"""``usher up --demo`` (``make demo``): three tenants share one model's queue while a live
table, fed by the Notifier's streams, shows each request's place, wait estimate, progress
and result: a heavy tenant floods the queue, lighter ones still get through quickly."""

from __future__ import annotations

import asyncio

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from usher.testing.stack import LocalStack
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["run_demo"]

STATE = {v: k.removeprefix("REQUEST_STATE_").lower() for k, v in request_pb2.RequestState.items()}


def auth(user: str) -> tuple[tuple[str, str]]:
    # Open access: each placeholder key is its own tenant.
    return (("authorization", f"Bearer {user}"),)


async def run_demo(stack: LocalStack, model: str, console: Console) -> None:
    scheduler_channel = grpc.aio.insecure_channel(stack.scheduler_address)
    notifier_channel = grpc.aio.insecure_channel(stack.notifier_address)
    scheduler = scheduler_pb2_grpc.SchedulerServiceStub(scheduler_channel)
    notifier = notifier_pb2_grpc.NotifierServiceStub(notifier_channel)
    rows: dict[str, tuple[str, notifier_pb2.WatchResponse | None]] = {}
    order: list[str] = []
    watchers: list[asyncio.Task[None]] = []

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
        "fair queuing across tenants (and carol's HIGH priority) put them near the front.\n"
    )
