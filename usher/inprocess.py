"""An in-process transport for the generated gRPC stubs (``usher serve``).

``LocalChannel`` stands where a ``grpc.aio.Channel`` would: a generated stub built on it
(``SchedulerServiceStub(local)``) calls the servicers registered on it in this process and
event loop, with no serialization, socket or HTTP/2 framing. The servicers are registered
the way a gRPC server takes them (``add_XServicer_to_server(servicer, local)``), so the
same servicer code answers both; callers see what a gRPC client sees: awaitable unary
calls, iterable and cancellable streams, ``grpc.aio.AioRpcError`` with the status, details
and rich error details (``grpc-status-details-bin``) a server would send. Errors are mapped
as ``usher.errors.ErrorMappingInterceptor`` maps them; deadlines (``timeout``) and
metadata (the caller's credential) act as over the wire.

Streams are pulled: the servicer's generator runs only while the caller waits for the next
message (back-pressure for free); ``cancel()`` closes it, as a client's cancel does.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from usher import metrics
from usher.errors import Internal, UsherError, to_error
from usher.grpc_types import Context
from usher.logs import get_logger
from usher.server import Registration

__all__ = ["LocalChannel", "LocalContext", "LocalStreamCall", "LocalUnaryCall"]

log = get_logger(__name__)
#: Calls made in process count where the servers count theirs (usher_grpc_server_calls_total):
#: in ``usher serve`` the Pool's Reserves and the Scheduler's Submits are these.
_CALLS = metrics.Children(metrics.GRPC_CALLS)

Metadata = Sequence[tuple[str, str | bytes]]
_UnaryHandler = Callable[[Any, Context], Awaitable[Any]]
_StreamHandler = Callable[[Any, Context], AsyncGenerator[Any, None]]


def _rpc_error(
    code: grpc.StatusCode, details: str, trailing: Metadata = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=details
    )


def _from_usher_error(error: UsherError) -> grpc.aio.AioRpcError:
    status = error.to_status()
    return _rpc_error(status.code, status.details, tuple(status.trailing_metadata or ()))


def _as_rpc_error(exc: Exception) -> grpc.aio.AioRpcError:
    """What the caller of a gRPC server would receive for ``exc`` raised by a handler."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc
    error = to_error(exc)
    if error is None:
        log.error("unhandled_error", error_type=type(exc).__name__, error=str(exc)[:300])
        error = Internal("internal error; it has been logged")
    return _from_usher_error(error)


class _Aborted(Exception):
    """``context.abort``: ends the handler with this status."""

    def __init__(self, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details())
        self.error = error


class LocalContext:
    """The part of ``grpc.aio.ServicerContext`` Usher's servicers use."""

    def __init__(self, metadata: Metadata | None, timeout: float | None) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: Metadata = ()
        self.initial: Metadata = ()

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def peer(self) -> str:
        return "local"

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def set_trailing_metadata(self, metadata: Metadata) -> None:
        self._trailing = tuple(metadata)

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        self.initial = tuple(metadata)

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Metadata = ()
    ) -> NoReturn:
        raise _Aborted(_rpc_error(code, details, tuple(trailing_metadata) or self._trailing))

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise _Aborted(_rpc_error(status.code, status.details, status.trailing_metadata or ()))

    def raise_set_status(self) -> None:
        """A handler that returned after ``set_code`` (not OK) failed the call."""
        if self._code is not None and self._code != grpc.StatusCode.OK:
            raise _rpc_error(self._code, self._details, self._trailing)

    @property
    def deadline(self) -> float | None:
        return self._deadline


def _deadline_error() -> grpc.aio.AioRpcError:
    return _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


async def _within(deadline: float | None, work: Awaitable[Any]) -> Any:
    """``work`` bounded by ``deadline`` (monotonic), a deadline error when it passes."""
    if deadline is None:
        return await work
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        if isinstance(work, asyncio.Future | asyncio.Task):
            work.cancel()
        elif asyncio.iscoroutine(work):
            work.close()
        raise _deadline_error()
    try:
        async with asyncio.timeout(remaining):
            return await work
    except TimeoutError:
        raise _deadline_error() from None


class LocalStreamCall:
    """One server-streaming call: ``async for`` its messages, ``cancel()`` to close it.

    Its deadline is one timer for the whole call, not one per message (a stream of tokens
    has thousands): when it fires while the caller waits for a message, that wait is
    cancelled and ends in DEADLINE_EXCEEDED; between messages it only marks the call."""

    def __init__(self, handler: _StreamHandler, request: Any, context: LocalContext) -> None:
        self._context = context
        self._stream = handler(request, cast(Context, context))
        self._running: asyncio.Task[Any] | None = None
        self._done = False
        self._expired = False
        self._closing: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        if context.deadline is not None:
            self._timer = asyncio.get_running_loop().call_later(
                max(0.0, context.deadline - time.monotonic()), self._expire
            )

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        if self._running is not None:
            self._running.cancel()

    def _end(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __aiter__(self) -> LocalStreamCall:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        if self._expired:  # it passed between two messages: the servicer's stream ends too
            self._end()
            self._close_soon()
            raise _deadline_error()
        task = self._running = asyncio.current_task()
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._end()
            self._context.raise_set_status()
            raise
        except asyncio.CancelledError:
            # The deadline's cancel (and no other) ends the call as a deadline would.
            if self._expired and task is not None and task.uncancel() == 0:
                self._end()
                raise _deadline_error() from None
            raise
        except _Aborted as aborted:
            self._end()
            raise aborted.error from None
        except Exception as exc:  # the generator ended with it
            self._end()
            raise _as_rpc_error(exc) from None
        finally:
            self._running = None

    async def read(self) -> Any:
        """The next message, or ``grpc.aio.EOF`` at the end (as ``UnaryStreamCall.read``)."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    async def _close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.aclose()

    def _close_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def cancel(self) -> bool:
        """Close the stream: the servicer's generator is ended (its ``finally`` runs), as
        when a gRPC client cancels. A caller waiting for the next message gets
        ``asyncio.CancelledError``, as from a cancelled ``grpc.aio`` call."""
        if self._done:
            return False
        self._end()
        running = self._running
        if running is not None and running is not asyncio.current_task():
            running.cancel()  # the generator is mid-step in that task: end it there
            return True
        self._close_soon()
        return True

    def done(self) -> bool:
        return self._done


class _LocalMethod:
    """The multi-callable a stub holds for one method."""

    def __init__(self, channel: LocalChannel, method: str) -> None:
        self._channel = channel
        self._method = method
        self._calls = _CALLS(method)


class LocalUnaryCall:
    """A unary call in process: awaited for its reply, as a ``grpc.aio.UnaryUnaryCall``.
    ``cancel()`` drops a call not awaited yet (the servicer never runs); one being awaited
    ends when the task awaiting it is cancelled, as a gRPC call does."""

    __slots__ = ("_context", "_run")

    def __init__(self, run: Coroutine[Any, Any, Any], context: LocalContext) -> None:
        self._run = run
        self._context = context

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run.__await__()

    async def initial_metadata(self) -> grpc.aio.Metadata:
        """What the servicer sent as initial metadata so far."""
        return grpc.aio.Metadata(*self._context.initial)

    def cancel(self) -> bool:
        if inspect.getcoroutinestate(self._run) != inspect.CORO_CREATED:
            return False
        self._run.close()
        return True


class _LocalUnary(_LocalMethod):
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **_: Any,
    ) -> LocalUnaryCall:
        self._calls.inc()
        context = LocalContext(metadata, timeout)
        return LocalUnaryCall(self._invoke(request, context), context)

    async def _invoke(self, request: Any, context: LocalContext) -> Any:
        handler = self._channel.handler(self._method)
        if handler is None or handler.unary_unary is None:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method} is not served here")
        call = cast(_UnaryHandler, handler.unary_unary)
        try:
            reply = await _within(context.deadline, call(request, cast(Context, context)))
        except _Aborted as aborted:
            raise aborted.error from None
        except grpc.aio.AioRpcError:
            raise
        except Exception as exc:
            raise _as_rpc_error(exc) from None
        context.raise_set_status()
        return reply


class _LocalStream(_LocalMethod):
    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **_: Any,
    ) -> LocalStreamCall:
        self._calls.inc()
        handler = self._channel.handler(self._method)
        if handler is None or handler.unary_stream is None:
            raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method} is not served here")
        return LocalStreamCall(
            cast(_StreamHandler, handler.unary_stream), request, LocalContext(metadata, timeout)
        )


class _Unsupported(_LocalMethod):
    def __call__(self, *_: Any, **__: Any) -> NoReturn:
        raise _rpc_error(grpc.StatusCode.UNIMPLEMENTED, f"{self._method}: streaming requests")


class LocalChannel:
    """Servicers registered like on a ``grpc.aio.Server``, called like through a channel.

    Build stubs with ``local.stub(SchedulerServiceStub)`` (typed as the async stub)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    @classmethod
    def serving(cls, registrations: Iterable[Registration]) -> LocalChannel:
        """A channel to these servicers (a service app's ``registrations``)."""
        local = cls()
        for registration in registrations:
            registration.add(local.as_server())
        return local

    # -- the server side: what add_XServicer_to_server calls ----------------------------

    def add_generic_rpc_handlers(self, handlers: Sequence[object]) -> None:
        """Registered method handlers (below) carry everything; nothing to keep."""

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in method_handlers.items():
            self._handlers[f"/{service_name}/{name}"] = handler

    def handler(self, method: str) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(method)

    def serves(self, service_name: str) -> bool:
        return any(m.startswith(f"/{service_name}/") for m in self._handlers)

    # -- the client side: what a generated stub's constructor calls -----------------------

    def unary_unary(self, method: str, *_: Any, **__: Any) -> _LocalUnary:
        return _LocalUnary(self, method)

    def unary_stream(self, method: str, *_: Any, **__: Any) -> _LocalStream:
        return _LocalStream(self, method)

    def stream_unary(self, method: str, *_: Any, **__: Any) -> _Unsupported:
        return _Unsupported(self, method)

    def stream_stream(self, method: str, *_: Any, **__: Any) -> _Unsupported:
        return _Unsupported(self, method)

    def as_server(self) -> grpc.aio.Server:
        """Itself, typed for ``add_XServicer_to_server`` (it takes only the two calls above)."""
        return cast(grpc.aio.Server, self)

    def as_channel(self) -> grpc.aio.Channel:
        """Itself, typed for a generated stub's constructor (``XStub(channel)``)."""
        return cast(grpc.aio.Channel, self)
