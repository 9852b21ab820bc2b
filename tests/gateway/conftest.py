"""Helpers for the gateway tests: gRPC stubs to the stack behind the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc
import httpx
import pytest

from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

ADMIN = (("authorization", "Bearer admin-token"),)


def auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


@dataclass
class Services:
    scheduler: scheduler_pb2_grpc.SchedulerServiceAsyncStub
    admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub

    async def get(self, request_id: str) -> request_pb2.LlmRequest:
        reply = await self.scheduler.Get(
            scheduler_pb2.GetRequest(id=request_id), metadata=ADMIN, timeout=10
        )
        return reply.request

    async def wait_state(
        self, request_id: str, *states: int, timeout: float = 10.0
    ) -> request_pb2.LlmRequest:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            request = await self.get(request_id)
            if request.state in states or asyncio.get_running_loop().time() > deadline:
                return request
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def services(stack: LocalStack) -> AsyncIterator[Services]:
    channel = grpc.aio.insecure_channel(stack.scheduler_address)
    yield Services(
        scheduler_pb2_grpc.SchedulerServiceStub(channel),
        scheduler_pb2_grpc.SchedulerAdminServiceStub(channel),
    )
    await channel.close()


#: The models of ``one_slot_stack``'s fleet.
WAITING_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")


def one_slot_stack(
    tokens_per_second: str,
    output_tokens: str,
    keepalive: str,
    *,
    open_access: bool = False,
    all_in_one: bool = False,
    extra_models: Sequence[str] = (),
) -> Iterator[LocalStack]:
    """A fleet of one slot per model (a few requests make a queue that moves), an external
    provider, the gateway; badges every 0.2 s suggesting "gpt-4o" when nothing local is
    calmer; ``open_access``: the local open mode (no credentials needed). For a module
    fixture: ``yield from one_slot_stack(...)``; ``all_in_one``: as ``usher serve``;
    ``extra_models``: served beside WAITING_MODELS."""
    models = (*WAITING_MODELS, *extra_models)
    config = StackConfig(
        all_in_one=all_in_one,
        emulator_args=(
            "--fleet",
            "1",
            "--models",
            ",".join(models),
            "--tokens-per-second",
            tokens_per_second,
            "--load-time",
            "0.05",
            "--parallel",
            "1",
            "--output-tokens",
            output_tokens,
        ),
        instance_options=";parallel=1",
        external_provider=True,
        scheduler_env={"USHER_DISPATCH_CONCURRENCY": "8", "USHER_DEFAULT_PARALLEL": "1"},
        notifier_env={
            "USHER_BADGE_INTERVAL_SECONDS": "0.2",
            "USHER_EXTERNAL_ALTERNATIVE": "gpt-4o",
        },
        common_env={"USHER_AUTH_OPEN": "true"} if open_access else {},
        gateway=True,
        gateway_env={"USHER_GATEWAY_KEEPALIVE_SECONDS": keepalive},
    )
    with LocalStack(config) as running:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            listed = httpx.get(running.gateway_url + "/api/tags").json()["models"]
            if len(listed) >= len(models):
                break
            time.sleep(0.1)
        yield running


class Ahead:
    """bob's requests, queued ahead of the test's own (at ``priority``, HIGH to be sure no
    fair share lets the test's request pass them); cancelled by ``release``."""

    def __init__(
        self,
        services: Services,
        priority: request_pb2.Priority.ValueType = request_pb2.PRIORITY_UNSPECIFIED,
    ) -> None:
        self.services = services
        self.priority = priority
        self.ids: list[str] = []

    async def add(self, count: int, model: str = WAITING_MODELS[0]) -> None:
        for _ in range(count):
            reply = await self.services.scheduler.Submit(
                scheduler_pb2.SubmitRequest(
                    model=model,
                    generate=request_pb2.GenerateInput(prompt=f"ahead of you {len(self.ids)}"),
                    priority=self.priority,
                ),
                metadata=auth("bob"),
                timeout=5,
            )
            self.ids.append(reply.request.id)

    async def release(self) -> None:
        for request_id in self.ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self.services.scheduler.Cancel(
                    scheduler_pb2.CancelRequest(id=request_id, reason="test over"),
                    metadata=ADMIN,
                    timeout=5,
                )
        self.ids.clear()
