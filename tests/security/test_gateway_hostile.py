"""The gateway against hostile bodies and stalling clients: every bad input is a 400 naming
its field (never a 500 with internal text), and a client that stops sending is cut off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from services.gateway.bodies import json_problem
from usher.testing.stack import LocalStack, StackConfig

pytestmark = pytest.mark.slow
MODEL = "llama3.2:1b"
READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    config = StackConfig(emulator_args=("--tokens-per-second", "0", "--load-time", "0.01"))
    with LocalStack(config) as running:
        running.start_gateway(
            {
                "USHER_GATEWAY_DEFAULT_TOKEN": "alice-token",
                "USHER_GATEWAY_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
            }
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the Pool has seen the fleet's models
            if httpx.get(running.gateway_url + "/api/tags").json()["models"]:
                break
            time.sleep(0.1)
        yield running


@pytest.fixture
async def http(stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        yield client


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_BODIES: list[tuple[str, str, str]] = [
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"num_predict":3e9}}}}',
        "options.num_predict",
    ),
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"seed":{2**70}}}}}',
        "options.seed",
    ),
    (
        "/v1/chat/completions",
        f'{{"model":"{MODEL}","seed":{2**70},"messages":[{{"role":"user","content":"x"}}]}}',
        "seed",
    ),
    (
        "/v1/chat/completions",
        f'{{"model":"{MODEL}","max_tokens":3e9,"messages":[{{"role":"user","content":"x"}}]}}',
        "max_tokens",
    ),
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"temperature":NaN}}}}',
        "body",
    ),
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"mirostat_tau":1e999}}}}',
        "options.mirostat_tau",
    ),
    ("/api/generate", f'{{"model":"{MODEL}","prompt":"\\ud800 lonely"}}', "prompt"),
    (
        "/api/chat",
        f'{{"model":"{MODEL}","messages":[{{"role":"user","content":"\\udfff"}}]}}',
        "messages[0].content",
    ),
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"stop":{nested(5000)}}}}}',
        "body",
    ),
    (
        "/api/generate",
        f'{{"model":"{MODEL}","prompt":"hi","options":{{"x":{nested(40)}}}}}',
        "options.x",
    ),
    (
        "/v1/embeddings",
        f'{{"model":"nomic-embed-text","input":"x","dimensions":{2**40}}}',
        "dimensions",
    ),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_BODIES)
async def test_bad_bodies_are_400_naming_the_field(
    http: httpx.AsyncClient, path: str, body: str, field: str
) -> None:
    reply = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400, reply.text
    text = reply.text
    assert field in text
    for internal in ("Traceback", "ValueError", "RecursionError", "surrogates not allowed"):
        assert internal not in text


def test_json_problems_name_the_field_at_any_depth() -> None:
    deep: object = "leaf"
    for _ in range(10_000):
        deep = [deep]
    assert json_problem({"a": deep}) == ("a" + "[0]" * 32, "nests deeper than 32 levels")
    assert json_problem({"a": {"b": [1, float("inf")]}}) == ("a.b[1]", "must be a finite number")
    assert json_problem({"k": 2**64}) == ("k", "is out of range")
    assert json_problem({"ok": [1, "two", {"three": 3.0}]}) is None


async def test_a_client_that_stalls_mid_body_is_cut_off(stack: LocalStack) -> None:
    host, port = stack.gateway_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model":'
    )
    await writer.drain()
    started = time.monotonic()
    status = await asyncio.wait_for(reader.readline(), READ_TIMEOUT + 10)
    assert status.startswith(b"HTTP/1.1 408"), status
    assert time.monotonic() - started < READ_TIMEOUT + 5
    await asyncio.wait_for(reader.read(), 2 * READ_TIMEOUT + 5)  # and the connection closes
    writer.close()


async def test_a_client_that_stalls_in_its_headers_is_cut_off(stack: LocalStack) -> None:
    host, port = stack.gateway_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    started = time.monotonic()
    await asyncio.wait_for(reader.read(), READ_TIMEOUT + 10)
    writer.close()
    assert time.monotonic() - started < READ_TIMEOUT + 5
