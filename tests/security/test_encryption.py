"""Prompts, results and streamed output are ciphertext in Redis; keys rotate by key id."""

from __future__ import annotations

import base64
import os
from typing import cast

import pytest
import redis.asyncio as aioredis
from cryptography.exceptions import InvalidTag

from services.scheduler.store import FinishedWork, QueueStore
from tests.scheduler.factories import new_request
from usher.config import ConfigError
from usher.crypto import Sealer, sealer_from_env
from usher.keys import ModelKeys
from usher.queue.records import QueueDefaults
from usher.v1 import request_pb2

KEY_A = base64.b64encode(os.urandom(32)).decode()
KEY_B = base64.b64encode(os.urandom(32)).decode()


async def test_payloads_results_and_tokens_are_ciphertext(redis_client: aioredis.Redis) -> None:
    sealer = sealer_from_env({"USHER_ENCRYPTION_KEYS": f"a:{KEY_A}"})
    store = QueueStore(redis_client, QueueDefaults(), sealer)
    request = new_request()
    await store.submit(request)
    keys = ModelKeys(request.model)
    raw_payload = cast(bytes | None, await redis_client.hget(keys.request(request.id), "payload"))
    assert raw_payload is not None and b"hello" not in raw_payload
    assert raw_payload.startswith(b"ug1")
    lease = await store.claim(request.model, "d")
    assert lease is not None and b"hello" in lease.request.payload  # decrypted for its user
    await store.progress(lease, "tokens", {"text": "secret answer", "tokens": 2})
    result = request_pb2.RequestResult(text="secret answer").SerializeToString()
    await store.finish(
        lease, FinishedWork(state=request_pb2.REQUEST_STATE_COMPLETED, result=result)
    )
    raw_result = cast(bytes | None, await redis_client.hget(keys.request(request.id), "result"))
    assert raw_result is not None and b"secret" not in raw_result
    events = cast(
        list[tuple[bytes, dict[bytes, bytes]]],
        await redis_client.xrange(keys.request_events(request.id)),
    )
    assert all(b"secret" not in value for _, fields in events for value in fields.values())
    stored = await store.get(request.id)
    assert (
        stored is not None
        and request_pb2.RequestResult.FromString(stored.result).text == "secret answer"
    )


def test_rotation_reads_old_keys_and_writes_the_active_one() -> None:
    old = sealer_from_env({"USHER_ENCRYPTION_KEYS": f"a:{KEY_A}"})
    sealed_by_a = old.seal(b"prompt", "r1")
    rotated = sealer_from_env(
        {"USHER_ENCRYPTION_KEYS": f"a:{KEY_A},b:{KEY_B}", "USHER_ENCRYPTION_KEY_ID": "b"}
    )
    assert rotated.open(sealed_by_a, "r1") == b"prompt"
    assert b"\x01b" in rotated.seal(b"prompt", "r1")[:8]  # written with key "b"
    assert rotated.open_text(rotated.seal_text("hi", "r1"), "r1") == "hi"


def test_tampering_or_swapping_requests_is_detected() -> None:
    sealer = sealer_from_env({"USHER_ENCRYPTION_KEYS": f"a:{KEY_A}"})
    assert isinstance(sealer, Sealer)
    sealed = sealer.seal(b"prompt", "r1")
    with pytest.raises(InvalidTag):
        sealer.open(sealed, "r2")  # bound to its request id
    with pytest.raises(InvalidTag):
        sealer.open(sealed[:-1] + bytes([sealed[-1] ^ 1]), "r1")


def test_bad_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        sealer_from_env({"USHER_ENCRYPTION_KEYS": "a:short"})
    with pytest.raises(ConfigError, match="not among"):
        sealer_from_env({"USHER_ENCRYPTION_KEYS": f"a:{KEY_A}", "USHER_ENCRYPTION_KEY_ID": "z"})
