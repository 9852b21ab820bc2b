"""A running request's output on its way to its event stream: buffered per request (at
most one write an interval, the first token at once) and written for every request running
here together (one pipeline for all the writes due at once)."""

from __future__ import annotations

import asyncio
import math

from services.scheduler.store import Lease, ProgressEvent, QueueStore
from usher.batching import Coalescer
from usher.logs import get_logger

__all__ = ["ProgressBuffer", "ProgressWriter"]

log = get_logger(__name__)

#: Most requests' progress written in one pipeline.
PROGRESS_BATCH = 256


class ProgressWriter:
    """The progress writes of every request running here, coalesced: those due while a
    write is under way go to Redis together in the next pipeline (up to PROGRESS_BATCH), so
    hundreds of streams cost a few round trips per interval, not one each. One request's
    writes stay in order (its buffer has one under way at a time)."""

    def __init__(self, store: QueueStore) -> None:
        self._writes: Coalescer[tuple[Lease, list[ProgressEvent]], bool] = Coalescer(
            store.progress_of_many, PROGRESS_BATCH
        )

    def write(self, lease: Lease, events: list[ProgressEvent]) -> asyncio.Future[bool]:
        """Queue ``events`` for ``lease``'s stream; the future says whether the lease held
        (or carries the Redis error)."""
        return self._writes.submit((lease, events))


class ProgressBuffer:
    """Output on its way to a running request's stream, at most one write every
    ``interval`` seconds. Tokens go out at once when the last write is that old (the first
    token is never held back: time to first token is what a waiting user feels), else when
    the interval is up. The model server's "started" note waits up to an interval to ride
    with the first tokens, and what is pending when the answer completes goes out in the
    same script call as the completion: a short answer costs one script call, not three."""

    def __init__(self, writer: ProgressWriter, lease: Lease, interval: float) -> None:
        self._writer = writer
        self._lease = lease
        self._interval = interval
        self._started: ProgressEvent | None = None
        self._text: list[str] = []
        self._count = 0
        self._last_write = -math.inf
        self._timer: asyncio.Handle | None = None
        #: The timer is the next turn of the loop (urgent tokens).
        self._soon = False
        self._flushing: asyncio.Future[bool] | None = None
        #: A write is under way (until its outcome was handled): no second one, no timer.
        self._writing = False
        self._closed = False

    def started(self, instance: str, served_model: str) -> None:
        self._started = ("started", {"instance": instance, "served_model": served_model})
        self._schedule(urgent=False)

    def tokens(self, text: str, completion_tokens: int) -> None:
        self._text.append(text)
        self._count = completion_tokens or self._count + 1
        self._schedule(urgent=True)

    def take(self) -> list[ProgressEvent]:
        """The pending events, in order; the buffer is empty afterwards."""
        events: list[ProgressEvent] = []
        if self._started is not None:
            events.append(self._started)
            self._started = None
        if self._text:
            events.append(("tokens", {"text": "".join(self._text), "tokens": self._count}))
            self._text = []
        return events

    async def close(self) -> list[ProgressEvent]:
        """Stop the timer, let a flush under way land, and hand back what is left."""
        self._closed = True
        self._cancel_timer()
        if self._flushing is not None:
            await asyncio.wait({self._flushing})  # landed or failed: either way, done
        return self.take()

    def _schedule(self, urgent: bool) -> None:
        if self._closed or self._writing:
            return  # the write under way schedules what arrived meanwhile when it ends
        loop = asyncio.get_running_loop()
        due = self._last_write + self._interval
        if urgent and loop.time() >= due:
            if not self._soon:
                # Out at the next turn of the loop, not in this one: an answer whose last
                # tokens and end arrive together (a short one) then goes out in one write
                # with its completion instead of two.
                self._cancel_timer()
                self._timer = loop.call_soon(self._fire)
                self._soon = True
        elif self._timer is None:
            # Tokens: when the interval since the last write is up; the note: an interval on.
            at = due if urgent else max(due, loop.time() + self._interval)
            self._timer = loop.call_at(at, self._fire)

    def _cancel_timer(self) -> None:
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._soon = False
        self._last_write = asyncio.get_running_loop().time()
        self._writing = True
        self._flushing = self._writer.write(self._lease, self.take())
        self._flushing.add_done_callback(self._written)

    def _written(self, written: asyncio.Future[bool]) -> None:
        self._writing = False
        if not written.cancelled() and (error := written.exception()) is not None:
            # Redis away: the completion carries the output anyway.
            log.warning("progress not written", request_id=self._lease.request.id, error=str(error))
        if not self._closed and (self._started is not None or self._text):
            # More arrived while writing: it goes out when the interval is up.
            self._timer = asyncio.get_running_loop().call_at(
                self._last_write + self._interval, self._fire
            )
