"""gRPC handlers of the Notifier: Watch (one request, resumable) and WatchQueues (badges)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any, cast

from services.notifier import updates
from services.notifier.badges import BadgeBoard
from services.notifier.fanout import Fanout, PositionUpdate, Subscriber, Update
from usher import messages, metrics
from usher.auth import SERVICE_ROLE, Authenticator, Principal
from usher.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from usher.grpc_types import Context
from usher.ids import event_id_key, is_event_id, is_request_id
from usher.logs import get_logger
from usher.queue import records
from usher.queue.eta import ModelAverages
from usher.queue.reads import Entries, QueueReader, WatchStart
from usher.queue.records import StoredRequest
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
_MAX_BADGE_MODELS = 100
#: A model hint longer than any model name is a mistake, not a hint.
_MAX_MODEL_HINT = 400


class _Cursor:
    """Where one Watch stream stands: the request as last shown, tokens so far, the last
    event id sent (its resume token)."""

    __slots__ = ("expected", "last", "last_key", "stale", "stored", "tokens", "view")

    def __init__(
        self, stored: StoredRequest, view: request_pb2.LlmRequest, expected: float
    ) -> None:
        self.stored = stored
        self.view = view
        self.expected = expected
        self.tokens = 0
        self.last = "0-0"
        self.last_key = (0, 0)
        #: ``stored`` is newer than ``view`` (a final-only watch skips the views between).
        self.stale = False

    def advance(self, event_id: str) -> None:
        self.last = event_id
        self.last_key = event_id_key(event_id) or (0, 0)


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(
        self, queue: QueueReader, fanout: Fanout, board: BadgeBoard, auth: Authenticator
    ) -> None:
        self.queue = queue
        self.fanout = fanout
        self.board = board
        self.auth = auth

    def caller(self, context: Context) -> Principal:
        return self.auth.authenticate(context.invocation_metadata())

    async def _open(
        self, request: notifier_pb2.WatchRequest, caller: Principal
    ) -> tuple[Subscriber, WatchStart]:
        """Subscribe, then read the request and its events at one instant and check the
        caller may watch it: one round trip when the model is given (a lookup first when
        not, or when the one given does not hold the request)."""
        request_id = request.id
        if not is_request_id(request_id):
            raise InvalidArgument(
                [FieldViolation("id", f"{request_id[:40]!r} is not a request id")]
            )
        if len(request.model) > _MAX_MODEL_HINT:
            raise InvalidArgument([FieldViolation("model", "is not a model name")])
        after = request.last_event_id or "0-0"
        model = request.model or await self.queue.model_of(request_id)
        start: WatchStart | None = None
        subscriber: Subscriber | None = None
        try:
            if model is not None:
                # Subscribe before reading history so nothing falls between the two.
                subscriber = self.fanout.join(request_id, model, not request.final_only)
                start = await self.queue.open_watch(model, request_id, after)
            if start is None and request.model:
                actual = await self.queue.model_of(request_id)
                if actual is not None and actual != model:
                    if subscriber is not None:
                        self.fanout.unsubscribe(subscriber)
                    subscriber = self.fanout.join(request_id, actual, not request.final_only)
                    start = await self.queue.open_watch(actual, request_id, after)
            if start is None or subscriber is None:
                raise NotFound(f"request {request_id} not found")
            stored = start.stored
            # The service role is the gateway watching for a browser whose signed watch
            # token it checked for this request (services.gateway.watch_tokens).
            if (
                caller.tenant not in stored.owners
                and not caller.is_admin
                and SERVICE_ROLE not in caller.roles
            ):
                raise PermissionDenied(f"request {request_id} belongs to another caller")
            # The owners are not shown to a watcher: not kept for the stream's life (the
            # prompt was not read).
            stored = replace(stored, owners=frozenset())
            self.fanout.opened(subscriber, stored, start.tip)
            return subscriber, replace(start, stored=stored)
        except BaseException:
            if subscriber is not None:
                self.fanout.unsubscribe(subscriber)
            raise

    def _text(self, fields: dict[str, str], request_id: str) -> str:
        return self.queue.sealer.open_text(fields.get("text", ""), request_id)

    async def _averages(self, stored: StoredRequest) -> tuple[ModelAverages, int]:
        """ETA inputs: read (at most once per cache period) for a queued request, whose ETA
        counts places; the cached ones otherwise, without waiting."""
        if stored.state == records.QUEUED:
            return await self.fanout.averages.get(stored.model)
        return self.fanout.averages.peek(stored.model)

    def Watch(
        self, request: notifier_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchResponse]:
        # A plain function returning the stream: on every server the ErrorMappingInterceptor's
        # wrapper (usher/server.py) is the async generator gRPC iterates, and the in-process
        # channel takes any async iterator.
        return self._watch(request, context)

    async def AwaitResult(
        self, request: notifier_pb2.AwaitResultRequest, context: Context
    ) -> notifier_pb2.AwaitResultResponse:
        # Watch with final_only, its one message answered: the same checks and errors.
        watch = self._watch(
            notifier_pb2.WatchRequest(id=request.id, model=request.model, final_only=True),
            context,
        )
        try:
            async for sent in watch:
                if updates.is_terminal_kind(sent.kind):
                    return notifier_pb2.AwaitResultResponse(update=sent)
        finally:
            await watch.aclose()
        raise Unavailable(f"the status of {request.id} ended before the request did")

    async def _watch(
        self, request: notifier_pb2.WatchRequest, context: Context
    ) -> AsyncGenerator[notifier_pb2.WatchResponse, None]:
        caller = self.caller(context)
        if request.last_event_id and not is_event_id(request.last_event_id):
            raise InvalidArgument(
                [FieldViolation("last_event_id", "is not an event id this service gave out")]
            )
        # final_only: the last update alone; the others move the cursor and are not built.
        final_only = request.final_only
        subscriber, start = await self._open(request, caller)
        metrics.WATCHERS.inc()
        # One generator for the whole stream (no inner one to pass each update through).
        try:
            cursor, first = await self._first(request, start, final_only)
            del start
            while first:
                # Popped as sent: a snapshot (all output so far) is not kept in this frame.
                sent = first.pop(0)
                yield sent
                if updates.is_terminal_kind(sent.kind):
                    return
                del sent
            view = cursor.view
            subscriber.told = (view.position.position, view.position.queue_length)
            if cursor.stored.is_terminal:
                return
            while True:
                item = await subscriber.get()
                if item is None:
                    # Fell behind (or quiet for long): replay from the last event sent.
                    for replayed in await self._catch_up(cursor, final_only):
                        yield replayed
                        if updates.is_terminal_kind(replayed.kind):
                            return
                    continue
                if isinstance(item, PositionUpdate):
                    response = None if final_only else self._position(cursor, item)
                elif not item.eid or item.key <= cursor.last_key:
                    continue  # already delivered (by replay or snapshot)
                else:
                    response = await self._live(cursor, item, final_only)
                if response is None:
                    continue
                yield response
                if updates.is_terminal_kind(response.kind):
                    return
        finally:
            metrics.WATCHERS.dec()
            self.fanout.unsubscribe(subscriber)

    async def _first(
        self, request: notifier_pb2.WatchRequest, start: WatchStart, final_only: bool
    ) -> tuple[_Cursor, list[notifier_pb2.WatchResponse]]:
        """Where a new watch stands, and what it is sent first: the events after its resume
        point, or the status now plus all output so far in one message (a snapshot)."""
        stored = start.stored
        averages = await self._averages(stored)
        cursor = _Cursor(
            stored, records.to_proto(stored, *averages), max(1.0, averages[0].output_tokens)
        )
        if request.last_event_id:
            cursor.advance(request.last_event_id)
            return cursor, await self._replay(cursor, start, averages, final_only)
        # It stands at the watch's tip: past the request's first event (written to the
        # model's stream alone), or its own stream's last.
        cursor.advance(start.tip)
        snapshot = self._snapshot(cursor, start.events, final_only)
        return cursor, [] if snapshot is None else [snapshot]

    def _position(self, cursor: _Cursor, item: PositionUpdate) -> notifier_pb2.WatchResponse | None:
        """A POSITION update when the request, shown queued, has a new place."""
        shown = cursor.view
        if shown.state != request_pb2.REQUEST_STATE_QUEUED or (
            shown.position.position == item.position
            and shown.position.queue_length == item.queue_length
        ):
            return None
        response, cursor.view = _position_response(item, self.board.external_available)
        _count(K.UPDATE_KIND_POSITION)
        return response

    def _snapshot(
        self, cursor: _Cursor, history: Entries, final_only: bool = False
    ) -> notifier_pb2.WatchResponse | None:
        """The first message of a new watch: the request now, all output of its current
        attempt so far, and the last event id (read at the same instant as the request).
        None for a final-only watch of a request not finished (the cursor moved alone)."""
        stored = cursor.stored
        so_far = _current_attempt_tokens([f for _, f in history])
        cursor.tokens = int(so_far[-1].get("tokens", 0)) if so_far else 0
        if history:
            cursor.advance(history[-1][0])
        # A finished request's snapshot is its final update, so every watch ends on one.
        kind = _TERMINAL_KIND.get(cursor.view.state, K.UPDATE_KIND_SNAPSHOT)
        if final_only and kind == K.UPDATE_KIND_SNAPSHOT:
            return None
        text = "".join(self._text(f, stored.id) for f in so_far)
        tokens = cursor.tokens
        if not so_far and kind == K.UPDATE_KIND_COMPLETED and not final_only:
            # Its output was not stored as it came (result only): all of it is the result's.
            text = cursor.view.result.text
            tokens = int(cursor.view.usage.completion_tokens)
        response = _response(
            kind,
            cursor.view,
            cursor.last if history else "",
            text_delta=text,
            completion_tokens=tokens,
            progress=updates.progress_fraction(tokens, cursor.expected) if tokens else 0.0,
            external=self.board.external_available,
        )
        _count(kind)
        return response

    async def _replay(
        self,
        cursor: _Cursor,
        start: WatchStart,
        averages: tuple[ModelAverages, int],
        final_only: bool = False,
    ) -> list[notifier_pb2.WatchResponse]:
        """The responses to events read with the request at one instant: each state change
        shows the request as read then (as the state its event announced)."""
        responses = []
        for event_id, fields in start.events:
            update = Update({**fields, "eid": event_id}, start.stored, True, averages)
            response = await self._live(cursor, update, final_only)
            if response is not None:
                responses.append(response)
        return responses

    async def _catch_up(
        self, cursor: _Cursor, final_only: bool = False
    ) -> list[notifier_pb2.WatchResponse]:
        """Replay the request's events after the cursor, read again with the request."""
        stored = cursor.stored
        start = await self.queue.open_watch(stored.model, stored.id, cursor.last)
        if start is None:
            return []
        start = replace(start, stored=replace(start.stored, owners=frozenset()))
        return await self._replay(cursor, start, await self._averages(start.stored), final_only)

    async def _live(
        self, cursor: _Cursor, update: Update, final_only: bool = False
    ) -> notifier_pb2.WatchResponse | None:
        """The response to one event (None when ``final_only`` and it is not the final
        one: the cursor moves, nothing is built). What every watcher of the request would
        build alike (the decrypted text, the request's view, the response) is built once,
        in ``update.memo``, by the first of them."""
        cursor.advance(update.eid)
        kind = update.kind
        fields = update.fields
        memo = update.memo
        if kind == K.UPDATE_KIND_PROGRESS:
            cursor.tokens = int(fields.get("tokens", cursor.tokens))
            if final_only:
                return None
            key = (cursor.tokens, id(cursor.view))
            hit = memo.get(key)
            if hit is None or hit[0] is not cursor.view:
                text = memo.get("text")
                if text is None:
                    text = memo["text"] = self._text(fields, cursor.stored.id)
                response = _response(
                    kind,
                    cursor.view,
                    update.eid,
                    text_delta=text,
                    completion_tokens=cursor.tokens,
                    progress=updates.progress_fraction(cursor.tokens, cursor.expected),
                )
                memo[key] = hit = (cursor.view, response)
            _count(kind)
            return cast(notifier_pb2.WatchResponse, hit[1])
        if fields.get("type") in ("running", "requeued"):
            cursor.tokens = 0  # a new attempt: earlier output is void
        if final_only and not updates.is_terminal_kind(kind):
            if update.snapshot is not None:
                cursor.stored, cursor.stale = update.snapshot, True
            return None
        # A state change: the request as read right after it (result, error, place, ETA).
        view = memo.get("view")
        if view is None:
            view = await self._state_view(cursor, update)
            if update.read:
                memo["view"] = view
        cursor.view = view
        if update.snapshot is not None:
            cursor.stored = update.snapshot
        shared: notifier_pb2.WatchResponse | None = (
            memo.get(("response", cursor.tokens)) if update.read else None
        )
        if shared is None:
            shared = _response(
                kind,
                view,
                update.eid,
                completion_tokens=cursor.tokens,
                external=self.board.external_available,
            )
            if update.read:
                memo[("response", cursor.tokens)] = shared
        _count(kind)
        return shared

    async def _state_view(self, cursor: _Cursor, update: Update) -> request_pb2.LlmRequest:
        fields = update.fields
        announced = int(fields["state"]) if fields.get("state", "").isdigit() else 0
        if update.read:
            fresh = update.snapshot  # read once for all watchers by the fan-out
        else:
            fresh = await self.queue.inspect(cursor.stored.model, cursor.stored.id)
            if fresh is not None:
                fresh = replace(fresh, payload=b"")
                cursor.stored = fresh
        if fresh is None:
            if cursor.stale:  # the request as last read, not shown yet
                cursor.view = records.to_proto(
                    cursor.stored, *self.fanout.averages.peek(cursor.stored.model)
                )
                cursor.stale = False
            view = request_pb2.LlmRequest()
            view.CopyFrom(cursor.view)
            if announced:
                view.state = announced  # type: ignore[assignment]
            return view
        averages, parallel = update.averages or await self.fanout.averages.get(fresh.model)
        if announced and announced != fresh.state:
            # Read after a later change (a batch held both): show the state this event
            # announced; the later event shows the rest.
            return records.to_proto(fresh, averages, parallel, state_override=announced)
        return records.to_proto(fresh, averages, parallel)

    async def WatchQueues(
        self, request: notifier_pb2.WatchQueuesRequest, context: Context
    ) -> AsyncIterator[notifier_pb2.WatchQueuesResponse]:
        self.caller(context)
        wanted = list(request.models)
        if len(wanted) > _MAX_BADGE_MODELS:
            raise InvalidArgument(
                [FieldViolation("models", f"at most {_MAX_BADGE_MODELS} models per watch")]
            )
        subscription = self.board.subscribe(wanted)
        try:
            if self.board.missing(wanted):
                await self.board.refresh()  # named models not badged yet: now, not in a second
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
            self.board.unsubscribe(subscription, wanted)


_COUNTERS: dict[int, Any] = {}


def _count(kind: int) -> None:
    """One update sent (the metric's child per kind resolved once)."""
    counter = _COUNTERS.get(kind)
    if counter is None:
        name = notifier_pb2.UpdateKind.Name(cast(Any, kind))
        counter = _COUNTERS[kind] = metrics.WATCH_UPDATES.labels(name)
    counter.inc()


def _response(
    kind: int,
    request: request_pb2.LlmRequest,
    event_id: str = "",
    *,
    text_delta: str = "",
    completion_tokens: int = 0,
    progress: float = 0.0,
    external: bool = False,
) -> notifier_pb2.WatchResponse:
    now = time.time()
    response = notifier_pb2.WatchResponse(
        prompt=messages.fallback_prompt(request, external, now)
        if request.state == request_pb2.REQUEST_STATE_QUEUED
        else "",
        event_id=event_id,
        kind=kind,  # type: ignore[arg-type]
        request=request,
        message=messages.request_message(request, kind, progress),
        text_delta=text_delta,
        completion_tokens=completion_tokens,
        progress=progress,
    )
    response.at.FromMilliseconds(int(now * 1000))
    return response


def _position_response(
    update: PositionUpdate, external: bool
) -> tuple[notifier_pb2.WatchResponse, request_pb2.LlmRequest]:
    """A POSITION update and the view it shows, built once for all the request's watchers."""
    built = update.memo.get("response")
    if built is None:
        averages, parallel = update.averages
        stored = replace(
            update.stored,
            state=request_pb2.REQUEST_STATE_QUEUED,
            position=update.position,
            queue_length=update.queue_length,
        )
        view = records.to_proto(stored, averages, parallel)
        built = update.memo["response"] = (
            _response(K.UPDATE_KIND_POSITION, view, external=external),
            view,
        )
    return cast(tuple[notifier_pb2.WatchResponse, request_pb2.LlmRequest], built)


def _current_attempt_tokens(events: list[dict[str, str]]) -> list[dict[str, str]]:
    """Token events of the latest attempt: a requeued request's earlier output is void."""
    out: list[dict[str, str]] = []
    for fields in events:
        if fields.get("type") in ("running", "requeued"):
            out = []
        elif fields.get("type") == "tokens":
            out.append(fields)
    return out
