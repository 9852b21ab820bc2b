"""The blocking client: ``UsherClient``, for scripts and code without an event loop.

```python
with UsherClient(token="alice-token") as usher:
    print(usher.submit_and_wait("llama3.2:1b", "Why is the sky blue?").text)
    for delta in usher.stream_tokens("llama3.2:1b", "Tell me a story"):
        print(delta, end="", flush=True)
```

It runs an ``AsyncUsherClient`` on a private event loop in a daemon thread, so it works the
same inside a program that has a loop of its own (a notebook, a web framework). Iterators
(``watch``, ``stream_tokens``, ``queues``) step the async ones on that loop; Ctrl-C while a
call blocks cancels that call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, TypeVar

from clients.aio import AsyncAdmin, AsyncUsherClient, TokenStream
from clients.types import Request, Submission

__all__ = ["Admin", "SyncTokenStream", "UsherClient"]

_T = TypeVar("_T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="usher-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self.loop.is_closed():
            coroutine.close()
            raise RuntimeError("the client is closed")
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C (or any escape) stops the call on the loop too
            raise

    def iterate(self, iterator: AsyncIterator[_T]) -> Iterator[_T]:
        async def step() -> tuple[bool, _T | None]:
            try:
                return True, await iterator.__anext__()
            except StopAsyncIteration:
                return False, None

        async def close() -> None:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                more, item = self.run(step())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self.loop.is_closed():
                self.run(close())

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class SyncTokenStream:
    """Iterator of a request's text deltas (see ``clients.aio.TokenStream``)."""

    def __init__(self, stream: TokenStream, runner: _LoopThread) -> None:
        self._stream = stream
        self._runner = runner
        self._iterator = runner.iterate(stream)

    def __iter__(self) -> SyncTokenStream:
        return self

    def __next__(self) -> str:
        return next(self._iterator)

    @property
    def submission(self) -> Submission | None:
        return self._stream.submission

    @property
    def request_id(self) -> str | None:
        return self._stream.request_id

    @property
    def request(self) -> Request | None:
        """The final request, once iteration is over."""
        return self._stream.request

    def close(self) -> None:
        self._iterator.close()  # type: ignore[attr-defined]

    def cancel(self, reason: str = "") -> Request | None:
        self.close()
        if self._stream.request_id is None:
            return None
        return self._runner.run(self._stream._client.cancel(self._stream.request_id, reason))


_P = ParamSpec("_P")


class _Driver:
    """Drives an async object on a loop thread; see ``blocking``."""

    _target: Any
    _runner: _LoopThread


def blocking(
    method: Callable[Concatenate[Any, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[_Driver, _P], _T]:
    """The blocking twin of an async method: the same arguments (and types), run on the
    driver's loop. One line per method instead of a copied signature."""

    def call(driver: _Driver, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return driver._runner.run(method(driver._target, *args, **kwargs))

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def iterating(
    method: Callable[Concatenate[Any, _P], AsyncIterator[_T]],
) -> Callable[Concatenate[_Driver, _P], Iterator[_T]]:
    """The blocking twin of an async iterator method: the same arguments, its items
    stepped on the driver's loop."""

    def call(driver: _Driver, /, *args: _P.args, **kwargs: _P.kwargs) -> Iterator[_T]:
        return driver._runner.iterate(method(driver._target, *args, **kwargs))

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def streaming(
    method: Callable[Concatenate[Any, _P], TokenStream],
) -> Callable[Concatenate[_Driver, _P], SyncTokenStream]:
    """The blocking twin of a method that answers with a ``TokenStream``."""

    def call(driver: _Driver, /, *args: _P.args, **kwargs: _P.kwargs) -> SyncTokenStream:
        return SyncTokenStream(method(driver._target, *args, **kwargs), driver._runner)

    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


def arguments_of(
    source: Callable[_P, object],
) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, _P], None]]:
    """Types an ``__init__`` that passes everything on to ``source`` as taking what
    ``source`` takes, so its signature is written once."""

    def typed(init: Callable[..., None]) -> Callable[Concatenate[Any, _P], None]:
        return init

    return typed


class Admin(_Driver):
    """Blocking operator calls (see ``clients.aio.AsyncAdmin``)."""

    def __init__(self, admin: AsyncAdmin, runner: _LoopThread) -> None:
        self._target = admin
        self._runner = runner

    update_queue_config = blocking(AsyncAdmin.update_queue_config)
    queue_stats = blocking(AsyncAdmin.queue_stats)
    set_tenant_weight = blocking(AsyncAdmin.set_tenant_weight)
    dead_letters = blocking(AsyncAdmin.dead_letters)
    retry_dead_letter = blocking(AsyncAdmin.retry_dead_letter)
    register_instance = blocking(AsyncAdmin.register_instance)
    deregister_instance = blocking(AsyncAdmin.deregister_instance)
    drain_instance = blocking(AsyncAdmin.drain_instance)
    set_instance_weight = blocking(AsyncAdmin.set_instance_weight)
    reset_circuit = blocking(AsyncAdmin.reset_circuit)
    load_model = blocking(AsyncAdmin.load_model)
    unload_model = blocking(AsyncAdmin.unload_model)


class UsherClient(_Driver):
    """The blocking twin of ``AsyncUsherClient``: same arguments, same methods."""

    @arguments_of(AsyncUsherClient)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._client = self._target = AsyncUsherClient(*args, **kwargs)
        self._runner = _LoopThread()
        self.admin = Admin(self._client.admin, self._runner)

    @property
    def async_client(self) -> AsyncUsherClient:
        """The client this one drives (use it only from its loop: ``run`` a coroutine)."""
        return self._client

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine of ``async_client`` on the client's loop and wait for it."""
        return self._runner.run(coroutine)

    def close(self) -> None:
        if not self._runner.loop.is_closed():
            self._runner.run(self._client.close())
            self._runner.stop()

    def __enter__(self) -> UsherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    submit = blocking(AsyncUsherClient.submit)
    submit_batch = blocking(AsyncUsherClient.submit_batch)
    get = blocking(AsyncUsherClient.get)
    list = blocking(AsyncUsherClient.list)
    cancel = blocking(AsyncUsherClient.cancel)
    switch_provider = blocking(AsyncUsherClient.switch_provider)

    watch = iterating(AsyncUsherClient.watch)
    wait = blocking(AsyncUsherClient.wait)
    submit_and_wait = blocking(AsyncUsherClient.submit_and_wait)

    stream_tokens = streaming(AsyncUsherClient.stream_tokens)
    tokens = streaming(AsyncUsherClient.tokens)
    queues = iterating(AsyncUsherClient.queues)

    list_instances = blocking(AsyncUsherClient.list_instances)
    model_stats = blocking(AsyncUsherClient.model_stats)
