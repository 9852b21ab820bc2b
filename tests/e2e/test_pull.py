"""Model pull through real processes: the gateway's /api/pull (the official ollama client)
and PoolAdmin.PullModel put a model on every instance with progress, and it is then served."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import ollama
import pytest

from clients.aio import AsyncUsherClient
from tests.clients.helpers import cli_env, run_cli
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
NEW_MODEL = "phi3:mini"


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(
        emulator_args=("--fleet", "2", "--instant", "--parallel", "2", "--models", "llama3.2:1b"),
        gateway=True,
    )
    with LocalStack(config) as running:
        yield running


async def test_the_ollama_client_pulls_a_model_onto_every_instance_and_it_serves(
    stack: LocalStack,
) -> None:
    async with httpx.AsyncClient() as http:
        refused = await http.post(
            f"{stack.gateway_url}/api/pull",
            json={"model": NEW_MODEL},
            headers={"Authorization": "Bearer alice-token"},
        )
    assert refused.status_code == 403  # pulling is an operator's call

    client = ollama.AsyncClient(
        host=stack.gateway_url, headers={"Authorization": "Bearer admin-token"}
    )
    lines = [p async for p in await client.pull(NEW_MODEL, stream=True)]
    statuses = [line.status or "" for line in lines]
    assert statuses[-1] == "success"
    assert {"success on ollama-0", "success on ollama-1"} <= set(statuses)
    downloads = [line for line in lines if line.total]
    assert downloads and downloads[-1].completed == downloads[-1].total

    async with httpx.AsyncClient() as http:
        for url in stack.model_urls:
            tags = (await http.get(f"{url}/api/tags")).json()["models"]
            assert NEW_MODEL in {m["name"] for m in tags}
    async with AsyncUsherClient(
        stack.scheduler_address, stack.notifier_address, token="alice-token"
    ) as alice:
        done = await alice.submit_and_wait(NEW_MODEL, "hello", wait_timeout=30)
    assert done.text

    # The SDK's operator call: one instance, Ollama's lines, each naming the instance.
    async with AsyncUsherClient(
        stack.scheduler_address,
        stack.notifier_address,
        pool_address=stack.pool_address,
        token="admin-token",
    ) as operator:
        steps = [s async for s in operator.admin.pull_model("gemma2:2b", "ollama-1")]
    assert steps[-1].status == "success" and {s.instance for s in steps} == {"ollama-1"}

    # And the operator's command line.
    pulled = run_cli("admin", "pull", "mistral:7b", env=cli_env(stack, "admin-token"))
    assert pulled.code == 0, pulled.stderr
    assert "ollama-0: success" in pulled.stdout and "ollama-1: success" in pulled.stdout
    assert "100%" in pulled.stdout
