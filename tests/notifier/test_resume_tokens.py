"""Watch's resume token is matched whole: a trailing newline used to reach Redis and come
back as UNKNOWN with Redis's error text."""

from __future__ import annotations

import grpc
import pytest

from services.scheduler.store import QueueStore
from tests.notifier.conftest import NotifierClient
from tests.scheduler.factories import new_request
from usher.v1 import notifier_pb2


@pytest.mark.parametrize("last", ["0-0\n", "0-0 ", "\n0-0", "1-2-3", "9" * 16 + "-0", "-"])
async def test_a_malformed_resume_token_is_invalid_argument(
    notifier: NotifierClient, store: QueueStore, last: str
) -> None:
    request = new_request(user="alice")
    await store.submit(request)
    call = notifier.stub.Watch(
        notifier_pb2.WatchRequest(id=request.id, last_event_id=last),
        metadata=notifier.auth("alice"),
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "last_event_id" in (info.value.details() or "")
