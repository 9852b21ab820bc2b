"""Every route of the gateway driven by schemathesis from the OpenAPI document the gateway
serves itself (``/openapi.json``), against the whole stack as real processes: no 500s,
every request it accepted still findable afterwards, Redis memory bounded.

Bounded and deterministic: a fixed number of examples per operation, derandomized."""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.core.result import Ok

from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import scheduler_pb2, scheduler_pb2_grpc

pytestmark = pytest.mark.slow
EXAMPLES = 60
#: Streams that never end by themselves (badges) or need an upgrade: checked elsewhere.
ENDLESS = r"^/queue/models/|/ws$"
ADMIN = {"Authorization": "Bearer admin-token"}
ALICE = {"Authorization": "Bearer alice-token"}
STORED_BOUND = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--tokens-per-second", "0", "--load-time", "0.01", "--output-tokens", "3:8"),
        scheduler_env={
            "USHER_TENANT_MAX_STORED_BYTES": str(STORED_BOUND),
            "USHER_MAX_PROMPT_CHARS": "200000",
        },
    )
    with LocalStack(config) as running:
        running.start_gateway({"USHER_GATEWAY_READ_TIMEOUT_SECONDS": "10"})
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the Pool has seen the fleet's models
            if httpx.get(running.gateway_url + "/api/tags").json()["models"]:
                break
            time.sleep(0.1)
        yield running


def test_the_gateway_serves_a_valid_openapi_document(stack: LocalStack) -> None:
    document = httpx.get(stack.gateway_url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    paths = set(document["paths"])
    assert {"/api/chat", "/v1/chat/completions", "/queue/stats", "/queue/requests/{id}"} <= paths
    assert len(list(schema.get_all_operations())) >= 35


def test_every_route_from_the_gateways_own_openapi_document(stack: LocalStack) -> None:
    schema = schemathesis.openapi.from_url(stack.gateway_url + "/openapi.json").exclude(
        path_regex=ENDLESS
    )
    accepted: list[str] = []
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    chosen = [ALICE]  # the operation's caller: operators for the admin routes
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid
        operation = result.ok()
        chosen[0] = ADMIN if operation.path.startswith(("/admin/", "/queue/stats")) else ALICE

        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def exercise(case: schemathesis.Case[Any]) -> None:
            body = case.body
            if isinstance(body, dict) and "model" in body and zlib.crc32(repr(body).encode()) % 2:
                # Half the generated bodies name a model the fleet serves, to get past the
                # catalogue into validation, the queue and the answer.
                body["model"] = "nomic-embed-text" if "embed" in case.path else "llama3.2:1b"
            response = case.call(base_url=stack.gateway_url, headers=chosen[0], timeout=60)
            statuses[response.status_code] += 1
            label = f"{case.method} {case.formatted_path}"
            if response.status_code == 500 or response.status_code > 504:
                failures.append(f"{label}: {response.status_code} {response.text[:300]}")
            # schemathesis gives headers lower-cased, each a list of values.
            request_ids = response.headers.get("x-usher-request-id") or []
            if request_ids and response.status_code in (200, 202):
                accepted.append(request_ids[0])

        exercise()
    print(f"statuses: {sorted(statuses.items())}; accepted requests: {len(accepted)}")
    assert not failures, "\n".join(failures[:20])
    assert accepted and statuses[400] and statuses[200]

    # Nothing accepted is lost: every request the gateway answered for can still be read.
    channel = grpc.insecure_channel(stack.scheduler_address)
    stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
    for request_id in accepted:
        stub.Get(
            scheduler_pb2.GetRequest(id=request_id),
            metadata=(("authorization", "Bearer admin-token"),),
            timeout=10,
        )
    channel.close()

    # Redis memory stays bounded: what the run stored is within a tenant's bound.
    client = redis.Redis.from_url(stack.redis_url)
    used = int(client.info("memory")["used_memory"])
    client.close()
    assert used < 64 * 1024 * 1024 + STORED_BOUND, used
