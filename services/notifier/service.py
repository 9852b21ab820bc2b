"""gRPC handlers of the Notifier: Watch (one request, resumable) and WatchQueues (badges)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, cast

from services.notifier import updates
from services.notifier.badges import BadgeBoard
from services.notifier.fanout import Event, Fanout, PositionChange, Subscriber, stream_id_key
from services.scheduler import records
from services.scheduler.store import QueueStore, StoredRequest
from usher import metrics
from usher.auth import Authenticator, Principal
from usher.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from usher.grpc_types import Context
from usher.ids import is_request_id
from usher.keys import ModelKeys
from usher.logs import get_logger
from usher.v1 import notifier_pb2, notifier_pb2_grpc, request_pb2

__all__ = ["NotifierServicer"]

K = notifier_pb2
log = get_logger(__name__)
_TERMINAL_KIND = {
    request_pb2.REQUEST_STATE_COMPLETED: K.UPDATE_KIND_COMPLETED,
    request_pb2.REQUEST_STATE_FAILED: K.UPDATE_KIND_FAILED,
    request_pb2.REQUEST_STATE_CANCELLED: K.UPDATE_KIND_CANCELLED,
    request_pb2.REQUEST_STATE_EXPIRED: K.UPDATE_KIND_EXPIRED,
}
#: A watcher that has heard nothing for this long checks the request's stream itself.
IDLE_CHECK_SECONDS = 30.0
_STREAM_ID = re.compile(r"^\d{1,15}-\d{1,15}$")


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(
        self, store: QueueStore, fanout: Fanout, board: BadgeBoard, auth: Authenticator
    ) -> None:
        self.store = store
        self.fanout = fanout
        self.board = board
        self.auth = auth

    def caller(self, context: Context) -> Principal:
        return self.auth.authenticate(context.invocation_metadata())

    async def _owned(self, request_id: str, caller: Principal) -> StoredRequest:
        if not is_request_id(request_id):
            raise InvalidArgument(
                [FieldViolation("id", f"{request_id[:40]!r} is not a request id")]
            )
        stored = await self.store.get(request_id)
        if stored is None:
            raise NotFound(f"request {request_id} not found")
        if caller.tenant not in stored.owners and not caller.is_admin:
            raise PermissionDenied(f"request {request_id} belongs to another caller")
        return stored

    def _text(self, fields: dict[str, str], request_id: str) -> str:
        return self.store.sealer.open_text(fields.get("text", ""), request_id)

    async def _view(self, stored: StoredRequest) -> request_pb2.LlmRequest:
        averages, parallel = await self.store.model_averages(stored.model)
        return records.to_proto(stored, averages, parallel)

    def _response(
        self, kind: int, request: request_pb2.LlmRequest, event_id: str = "", **extra: object
    ) -> notifier_pb2.WatchResponse:
        fraction = cast(float, extra.get("progress", 0.0))
        response = notifier_pb2.WatchResponse(
            event_id=event_id,
            kind=kind,  # type: ignore[arg-type]
            request=request,
            message=updates.request_message(request, kind, fraction),
            **extra,  # type: ignore[arg-type]
        )
        response.at.FromMilliseconds(int(time.time() * 1000))
        metrics.WATCH_UPDATES.labels(notifier_pb2.UpdateKind.Name(cast(Any, kind))).inc()
        return response

    async def _replay(
        self, model: str, request_id: str, after: str
    ) -> list[tuple[str, dict[str, str]]]:
        raw = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.store.redis.xrange(
                ModelKeys(model).request_events(request_id), f"({after}", "+"
            ),
        )
        return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in raw]

    async def Watch(
        self, request: notifier_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchResponse]:
        caller = self.caller(context)
        if request.last_event_id and not _valid_stream_id(request.last_event_id):
            raise InvalidArgument(
                [FieldViolation("last_event_id", "is not an event id this service gave out")]
            )
        stored = await self._owned(request.id, caller)
        # Subscribe before reading history so nothing falls between the two.
        subscriber = self.fanout.subscribe(stored.id, stored.model)
        metrics.WATCHERS.inc()
        try:
            async for response in self._watch(stored, subscriber, request.last_event_id):
                yield response
        finally:
            metrics.WATCHERS.dec()
            self.fanout.unsubscribe(subscriber)

    async def _watch(
        self, stored: StoredRequest, subscriber: Subscriber, last_event_id: str
    ) -> AsyncIterator[notifier_pb2.WatchResponse]:
        view = await self._view(stored)
        tokens = 0
        expected = await self._expected_output(stored)
        if last_event_id:
            last = last_event_id
            for event_id, fields in await self._replay(stored.model, stored.id, last):
                last = event_id
                response, view, tokens = await self._apply(
                    stored, view, fields, event_id, tokens, expected
                )
                yield response
                if updates.is_terminal_kind(response.kind):
                    return
        else:
            # A new watcher gets the status now plus all output so far, in one message.
            history = await self._replay(stored.model, stored.id, "0-0")
            last = history[-1][0] if history else "0-0"
            so_far = _current_attempt_tokens([f for _, f in history])
            text = "".join(self._text(f, stored.id) for f in so_far)
            tokens = int(so_far[-1].get("tokens", 0)) if so_far else 0
            if history and history[-1][1].get("state") != str(stored.state):
                # It moved on between the two reads: show it as of the last event read.
                fresh = await self.store.inspect(stored.model, stored.id)
                if fresh is not None:
                    stored, view = fresh, await self._view(fresh)
            # A finished request's snapshot is its final update, so every watch ends on one.
            kind = _TERMINAL_KIND.get(view.state, K.UPDATE_KIND_SNAPSHOT)
            yield self._response(
                kind,
                view,
                last if history else "",
                text_delta=text,
                completion_tokens=tokens,
                progress=updates.progress_fraction(tokens, expected) if tokens else 0.0,
            )
        subscriber.position = (view.position.position, view.position.queue_length)
        if stored.is_terminal:
            return
        while True:
            item: Event | PositionChange | None
            try:
                item = await asyncio.wait_for(subscriber.queue.get(), IDLE_CHECK_SECONDS)
            except TimeoutError:
                # Quiet for a while: make sure nothing was missed (a reader restart, a race).
                subscriber.lagged = True
                item = None
            if subscriber.lagged:
                # The watcher fell behind and events were dropped: replay from the last one sent.
                subscriber.lagged = False
                while not subscriber.queue.empty():
                    subscriber.queue.get_nowait()
                for event_id, fields in await self._replay(stored.model, stored.id, last):
                    last = event_id
                    response, view, tokens = await self._apply(
                        stored, view, fields, event_id, tokens, expected
                    )
                    yield response
                    if updates.is_terminal_kind(response.kind):
                        return
                continue
            if item is None:
                continue
            if isinstance(item, PositionChange):
                subscriber.unsent_position = None
                if view.state != request_pb2.REQUEST_STATE_QUEUED:
                    continue
                view.position.position = item.position
                view.position.queue_length = item.queue_length
                averages, parallel = await self.store.model_averages(stored.model)
                estimate = records.eta_for(_as_stored(stored, item), averages, parallel)
                if estimate is not None:
                    view.eta.min.CopyFrom(records.duration_from_seconds(estimate.min_seconds))
                    view.eta.max.CopyFrom(records.duration_from_seconds(estimate.max_seconds))
                yield self._response(K.UPDATE_KIND_POSITION, view)
                continue
            if not item.eid or stream_id_key(item.eid) <= stream_id_key(last):
                continue  # already delivered (by replay or snapshot)
            last = item.eid
            response, view, tokens = await self._apply(
                stored, view, item.fields, item.eid, tokens, expected
            )
            yield response
            if updates.is_terminal_kind(response.kind):
                return

    async def _expected_output(self, stored: StoredRequest) -> float:
        averages, _ = await self.store.model_averages(stored.model)
        return max(1.0, averages.output_tokens)

    async def _apply(
        self,
        stored: StoredRequest,
        view: request_pb2.LlmRequest,
        fields: dict[str, str],
        event_id: str,
        tokens: int,
        expected: float,
    ) -> tuple[notifier_pb2.WatchResponse, request_pb2.LlmRequest, int]:
        kind = updates.EVENT_KINDS.get(fields.get("type", ""), K.UPDATE_KIND_UNSPECIFIED)
        if kind == K.UPDATE_KIND_PROGRESS:
            tokens = int(fields.get("tokens", tokens))
            fraction = updates.progress_fraction(tokens, expected)
            response = self._response(
                kind,
                view,
                event_id,
                text_delta=self._text(fields, stored.id),
                completion_tokens=tokens,
                progress=fraction,
            )
            return response, view, tokens
        # A state change: read the request again (result, error, position, ETA).
        fresh = await self.store.inspect(stored.model, stored.id)
        if fresh is not None:
            view = await self._view(fresh)
        elif fields.get("state"):
            view.state = int(fields["state"])  # type: ignore[assignment]
        return self._response(kind, view, event_id, completion_tokens=tokens), view, tokens

    async def WatchQueues(
        self, request: notifier_pb2.WatchQueuesRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchQueuesResponse]:
        self.caller(context)
        wanted = list(request.models)
        subscription = self.board.subscribe()
        try:
            last: bytes = b""
            while True:
                badges = self.board.current(wanted)
                response = notifier_pb2.WatchQueuesResponse(badges=badges)
                payload = response.SerializeToString()
                if payload != last:
                    last = payload
                    response.at.FromMilliseconds(int(time.time() * 1000))
                    yield response
                await subscription.wait()
                subscription.clear()
        finally:
            self.board.unsubscribe(subscription)


def _valid_stream_id(text: str) -> bool:
    return _STREAM_ID.match(text) is not None


def _as_stored(stored: StoredRequest, change: PositionChange) -> StoredRequest:
    return replace(
        stored,
        state=request_pb2.REQUEST_STATE_QUEUED,
        position=change.position,
        queue_length=change.queue_length,
    )


def _current_attempt_tokens(events: list[dict[str, str]]) -> list[dict[str, str]]:
    """Token events of the latest attempt: a requeued request's earlier output is void."""
    out: list[dict[str, str]] = []
    for fields in events:
        if fields.get("type") in ("running", "requeued"):
            out = []
        elif fields.get("type") == "tokens":
            out.append(fields)
    return out
