"""One HTTP request's life in Usher: Submit to the Scheduler, Watch on the Notifier until
the request ends (AwaitResult for an answer sent whole), Cancel when the client goes away.

``RequestFlow.events()`` turns the Notifier's updates into three events for the
renderers: ``Started`` (the request left the queue; its queue wait is known), ``Text``
(new output) and ``Finished`` (completed, with result and usage). A request that ends
otherwise (expired, failed, cancelled) raises ``GatewayError``.

Output is delivered exactly once although the Watch may be resumed (a Notifier restart:
the stream continues from the last event id) and the request may be run again (REQUEUED:
its output so far is void and it restarts from the beginning). After a restart only text
beyond what the client already has is passed on, as long as the new run agrees with it; a
new run that says something else cannot be streamed (the client has the other words), so
the answer ends with an error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from services.gateway.backend import Backend, bearer
from services.gateway.bodies import queue_wait_ms
from services.gateway.errors import GatewayError, error_from_request, rpc_error
from usher.ids import REQUEST_ID_METADATA
from usher.queue.records import TERMINAL_STATES
from usher.v1 import notifier_pb2, request_pb2, scheduler_pb2

__all__ = ["Finished", "FlowEvent", "RequestFlow", "Started", "Text", "continuation"]

K = notifier_pb2
_TERMINAL = frozenset(
    {K.UPDATE_KIND_COMPLETED, K.UPDATE_KIND_FAILED, K.UPDATE_KIND_CANCELLED, K.UPDATE_KIND_EXPIRED}
)
_RESUMABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)
_MAX_RESUMES = 6
#: The longest an answer sent whole is awaited in the Scheduler's Submit (``await_result``):
#: a longer one is waited for on the Notifier. Its client leaving meanwhile is acted on once
#: the Submit answers (a unary call's answer brings its id), so this bounds how late the
#: request of a client who left is cancelled.
AWAIT_RESULT_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Started:
    request: request_pb2.LlmRequest
    queue_wait_ms: int


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    request: request_pb2.LlmRequest


FlowEvent = Started | Text | Finished


def continuation(emitted: str, attempt: str) -> str | None:
    """Text of ``attempt`` beyond what was already ``emitted`` ("" when it has not caught
    up yet); None when the two disagree (a restarted run said something else)."""
    if len(attempt) <= len(emitted):
        return "" if emitted.startswith(attempt) else None
    return attempt[len(emitted) :] if attempt.startswith(emitted) else None


class RequestFlow:
    def __init__(
        self,
        backend: Backend,
        token: str,
        submit: scheduler_pb2.SubmitRequest,
        *,
        deadline_seconds: float | None = None,
    ) -> None:
        self.backend = backend
        self.token = token
        self.submit_request = submit
        self.model = submit.model
        self.request_id = ""
        self.finished = False
        #: The request as the last update showed it (its place while queued).
        self.latest: request_pb2.LlmRequest | None = None
        self._deadline = time.monotonic() + deadline_seconds if deadline_seconds else None
        self._cancel_sent = False

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - time.monotonic())

    async def submit(self) -> None:
        """Submit the request. One whose caller reads the result alone asks the Scheduler
        to answer with its end when it runs it at once (``await_result``): then no wait on
        the Notifier follows."""
        timeout = self.backend.settings.rpc_timeout_seconds
        remaining = self._remaining()
        submit = self.submit_request
        if submit.result_only:
            submit.await_result.FromMilliseconds(round(AWAIT_RESULT_SECONDS * 1000))
        rpc = self.backend.scheduler.Submit(
            submit,
            metadata=bearer(self.token),
            timeout=min(timeout, remaining) if remaining is not None else timeout,
        )
        call = asyncio.ensure_future(rpc)
        try:
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The client left while the Submit was on its way (or waited for the end):
            # cancel what it queued once the Submit answers.
            call.add_done_callback(self._cancel_after_submit)
            raise
        except grpc.aio.AioRpcError as exc:
            # A Submit that waited for the end sent the id first: a call broken after
            # that (its Scheduler gone) leaves a queued request to wait for on the Notifier.
            self.request_id = await _sent_id(rpc) if exc.code() in _RESUMABLE else ""
            if not self.request_id:
                raise rpc_error(exc, self.model) from None
            return
        self._accepted(reply.request)

    def _accepted(self, request: request_pb2.LlmRequest) -> None:
        """The request as Submit answered it (ended already when it waited for the end)."""
        self.request_id = request.id
        self.latest = request
        self.finished = request.state in TERMINAL_STATES

    def _cancel_after_submit(self, call: asyncio.Future[scheduler_pb2.SubmitResponse]) -> None:
        if not call.cancelled() and call.exception() is None:
            self._accepted(call.result().request)
            self.cancel_soon("the client disconnected")

    def cancel_soon(self, reason: str) -> None:
        """Cancel the request (once) in the background: its client is gone."""
        if self.request_id and not self.finished and not self._cancel_sent:
            self._cancel_sent = True
            self.backend.spawn(self.backend.cancel(self.request_id, self.token, reason))

    async def events(self, final_only: bool = False) -> AsyncGenerator[FlowEvent, None]:
        """The request's events until it ends; ``final_only`` (an answer sent whole) asks the
        Notifier for the last update alone, so ``Started`` comes just before ``Finished``."""
        if self.finished and self.latest is not None:  # the Submit answered with its end
            yield Started(self.latest, queue_wait_ms(self.latest))
            for event in self._ending(self.latest, ""):
                yield event
            return
        last_event_id = ""
        started = False
        emitted = ""  # text the consumer already has
        attempt = ""  # text of the current run
        resumes = 0
        while True:
            call, received = self._updates(last_event_id, final_only)
            try:
                async for update in received:
                    resumes = 0
                    if update.event_id:
                        last_event_id = update.event_id
                    kind = update.kind
                    request = update.request
                    self.latest = request
                    if kind in (K.UPDATE_KIND_REQUEUED, K.UPDATE_KIND_RUNNING):
                        attempt = ""  # a new run starts from the beginning
                    if not started and (
                        request.state == request_pb2.REQUEST_STATE_RUNNING
                        or kind in (K.UPDATE_KIND_PROGRESS, K.UPDATE_KIND_COMPLETED)
                    ):
                        started = True
                        yield Started(request, queue_wait_ms(request))
                    if update.text_delta and kind != K.UPDATE_KIND_REQUEUED:
                        attempt += update.text_delta
                        fresh = self._beyond(emitted, attempt)
                        if fresh:
                            emitted += fresh
                            yield Text(fresh)
                    if kind in _TERMINAL:
                        for event in self._ending(request, emitted):
                            yield event
                        return
            except grpc.aio.AioRpcError as exc:
                if self._watch_failed(exc, resumes, final_only) == "again":
                    continue
            finally:
                call.cancel()
            # The stream ended without a final update or broke: resume after the last event.
            resumes += 1
            if resumes > _MAX_RESUMES:
                raise GatewayError(
                    502, "upstream_error", "the status stream ended early", model=self.model
                )
            await asyncio.sleep(min(2.0, 0.1 * 2**resumes))

    def _ending(self, request: request_pb2.LlmRequest, emitted: str) -> Iterator[FlowEvent]:
        """The events of the request's end, after ``emitted`` text: its error raised, or the
        rest of its text and ``Finished``."""
        self.finished = True
        error = error_from_request(request)
        if error is not None:
            raise error
        fresh = self._beyond(emitted, request.result.text)
        if fresh:
            yield Text(fresh)
        yield Finished(request)

    def _watch_failed(
        self, exc: grpc.aio.AioRpcError, resumes: int, final_only: bool
    ) -> Literal["again", "resume"]:
        """Whether a failed call for updates is made again at once ("again") or resumed
        after a pause ("resume"); raises what the client is told otherwise."""
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.cancel_soon("the client's deadline passed")
            raise GatewayError(
                504,
                "timeout",
                "Request timed out. Please try again with a shorter prompt or later.",
                model=self.model,
            ) from None
        if code == grpc.StatusCode.UNIMPLEMENTED and final_only and self.backend.await_result:
            self.backend.await_result = False  # a Notifier older than AwaitResult: Watch it
            return "again"
        if code not in _RESUMABLE or resumes >= _MAX_RESUMES:
            raise rpc_error(exc, self.model) from None
        return "resume"

    def _updates(
        self, last_event_id: str, final_only: bool
    ) -> tuple[Any, AsyncIterable[notifier_pb2.WatchResponse]]:
        """A call to the Notifier for the request's updates after ``last_event_id``, and
        the updates it gives."""
        # The model as Submit answered it spares the Notifier a lookup.
        model = self.latest.model if self.latest is not None else self.model
        if final_only and self.backend.await_result:
            # The final update alone: one unary call, cheaper than a stream of one.
            call = self.backend.notifier.AwaitResult(
                notifier_pb2.AwaitResultRequest(id=self.request_id, model=model),
                metadata=bearer(self.token),
                timeout=self._remaining(),
            )
            return call, _answer_of(call)
        watch = self.backend.notifier.Watch(
            notifier_pb2.WatchRequest(
                id=self.request_id,
                last_event_id=last_event_id,
                model=model,
                final_only=final_only,
            ),
            metadata=bearer(self.token),
            timeout=self._remaining(),
        )
        return watch, watch

    def _beyond(self, emitted: str, attempt: str) -> str:
        fresh = continuation(emitted, attempt)
        if fresh is not None:
            return fresh
        self.cancel_soon("a restarted run diverged from the output already sent")
        raise GatewayError(
            502,
            "restarted",
            "the model server failed and the request ran again with a different answer; "
            "the streamed output is incomplete, please retry",
            model=self.model,
        )


async def _sent_id(rpc: Any) -> str:
    """The request id a Submit that waits for the end sent first ("" when none came)."""
    try:
        metadata = await rpc.initial_metadata()
    except grpc.aio.AioRpcError:
        return ""
    sent = metadata.get(REQUEST_ID_METADATA) if metadata is not None else None
    return sent if isinstance(sent, str) else ""


async def _answer_of(
    call: grpc.aio.UnaryUnaryCall[Any, notifier_pb2.AwaitResultResponse],
) -> AsyncIterator[notifier_pb2.WatchResponse]:
    """AwaitResult's answer as the one update of a watch."""
    yield (await call).update
