"""Helpers for the gateway tests: gRPC stubs to the stack behind the gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from usher.testing.stack import LocalStack
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
