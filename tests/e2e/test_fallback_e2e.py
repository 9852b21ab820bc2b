"""Fallback through real processes: the operator's default policy (per model, per tenant,
overridden by the request), and automatic hand-over to the external provider when no local
instance is healthy, with the product's words — never "processed by the local AI model"
for a request the external provider runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from clients.aio import AsyncUsherClient
from clients.types import RequestState
from usher import messages
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
ADMIN = (("authorization", "Bearer admin-token"),)
R = request_pb2
FAST = ("--instant", "--parallel", "4", "--models", "llama3.2:1b,qwen2.5:0.5b")


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        model_servers=(
            (FAST, ";parallel=4"),  # the local fleet: one Ollama
            (FAST, ";kind=openai;external=true;parallel=4"),  # the external provider
        ),
        pool_env={"USHER_POOL_HEALTH_INTERVAL_SECONDS": "0.2"},
        scheduler_env={"USHER_REAP_INTERVAL_SECONDS": "0.1"},
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture
async def admin(
    stack: LocalStack,
) -> AsyncIterator[scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub]:
    async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
        yield scheduler_pb2_grpc.SchedulerAdminServiceStub(channel)


def client(stack: LocalStack, user: str) -> AsyncUsherClient:
    return AsyncUsherClient(stack.scheduler_address, stack.notifier_address, token=f"{user}-token")


async def test_the_operator_sets_default_fallback_policies_per_model_and_tenant(
    stack: LocalStack, admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub
) -> None:
    model = "qwen2.5:0.5b"
    await admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(
            model=model, fallback_policy=R.FALLBACK_POLICY_AFTER_TIMEOUT
        ),
        metadata=ADMIN,
    )
    await admin.SetTenantLimits(
        scheduler_pb2.SetTenantLimitsRequest(
            tenant=R.Tenant(user="bob", organization="acme"),
            limits=scheduler_pb2.TenantLimits(fallback_policy=R.FALLBACK_POLICY_LOCAL_ONLY),
        ),
        metadata=ADMIN,
    )
    async with client(stack, "alice") as alice, client(stack, "bob") as bob:
        by_model = await alice.submit(model, "hi")
        by_tenant = await bob.submit(model, "hi")
        by_request = await bob.submit(model, "hi", fallback="none")
        elsewhere = await alice.submit(MODEL, "hi")  # no defaults: the Scheduler's (none)
    assert by_model.request.raw.fallback_policy == R.FALLBACK_POLICY_AFTER_TIMEOUT
    assert by_tenant.request.raw.fallback_policy == R.FALLBACK_POLICY_LOCAL_ONLY
    assert by_request.request.raw.fallback_policy == R.FALLBACK_POLICY_NONE
    assert elsewhere.request.raw.fallback_policy == R.FALLBACK_POLICY_NONE
    await admin.SetTenantLimits(
        scheduler_pb2.SetTenantLimitsRequest(
            tenant=R.Tenant(user="bob", organization="acme"), limits=scheduler_pb2.TenantLimits()
        ),
        metadata=ADMIN,
    )


async def test_a_long_queue_offers_the_external_provider_to_those_who_may_switch(
    stack: LocalStack, admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub
) -> None:
    model = "qwen2.5:0.5b"  # its default policy is AFTER_TIMEOUT (the first test)
    await admin.PauseQueue(
        scheduler_pb2.PauseQueueRequest(model=model, paused=True), metadata=ADMIN
    )
    try:
        async with client(stack, "alice") as alice:
            queued = [await alice.submit(model, f"in line {i}") for i in range(8)]
            kept = await alice.submit(model, "mine stays local", fallback="local_only")
            await asyncio.sleep(1.5)  # the Notifier's badge pass sees the external provider
            first = await anext(aiter(alice.watch(queued[-1].id, timeout=10)))
            local = await anext(aiter(alice.watch(kept.id, timeout=10)))
        assert first.raw.prompt == messages.LONG_QUEUE_PROMPT
        assert local.raw.prompt == ""  # a local-only request is never offered the switch
    finally:
        await admin.PauseQueue(
            scheduler_pb2.PauseQueueRequest(model=model, paused=False), metadata=ADMIN
        )


async def test_with_no_local_instance_requests_go_to_the_external_provider_and_are_told_so(
    stack: LocalStack, admin: scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub
) -> None:
    await admin.UpdateQueueConfig(
        scheduler_pb2.UpdateQueueConfigRequest(
            model=MODEL, fallback_policy=R.FALLBACK_POLICY_AFTER_TIMEOUT
        ),
        metadata=ADMIN,
    )
    async with client(stack, "alice") as alice:
        local = await alice.submit_and_wait(MODEL, "while all is well", wait_timeout=30)
        assert local.result is not None and local.result.served_by_instance == "ollama-0"
        stack.model_servers[0].kill()  # the whole local fleet is down
        await asyncio.sleep(1.0)  # the Pool's health pass sees it
        kept = await alice.submit(MODEL, "stay here", fallback="local_only")
        submitted = await alice.submit(MODEL, "the fleet is down")
        updates = [u async for u in alice.watch(submitted.id, timeout=30)]
        final = updates[-1].request
        assert final.state == RequestState.COMPLETED
        assert final.result is not None and final.result.served_by_instance == "ollama-1"
        said = [u.message for u in updates]
        assert messages.UNAVAILABLE_NOTICE in said
        assert messages.EXTERNAL_PROCESSING in said
        assert messages.LOCAL_PROCESSING not in said
        # A local-only request never leaves: it waits for the local fleet.
        waiting = await alice.get(kept.id)
        assert waiting.state == RequestState.QUEUED and waiting.raw.route != R.ROUTE_EXTERNAL
        await alice.cancel(kept.id)
