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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Sequence
from concurrent.futures import Future
from datetime import timedelta
from typing import Any, TypeVar, Unpack

import grpc

from clients.aio import AsyncAdmin, AsyncUsherClient, ChatMessageLike, SubmitOptions, TokenStream
from clients.retry import RetryPolicy
from clients.types import Badge, Request, RequestState, Submission, Update
from usher.v1 import pool_pb2, scheduler_pb2

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


class Admin:
    """Blocking operator calls (see ``clients.aio.AsyncAdmin``)."""

    def __init__(self, admin: AsyncAdmin, runner: _LoopThread) -> None:
        self._admin = admin
        self._run = runner.run

    def update_queue_config(
        self,
        model: str,
        *,
        max_queue_size: int | None = None,
        queue_timeout: float | timedelta | None = None,
        max_attempts: int | None = None,
        lease_duration: float | timedelta | None = None,
        parallel: int | None = None,
    ) -> scheduler_pb2.QueueConfig:
        return self._run(
            self._admin.update_queue_config(
                model,
                max_queue_size=max_queue_size,
                queue_timeout=queue_timeout,
                max_attempts=max_attempts,
                lease_duration=lease_duration,
                parallel=parallel,
            )
        )

    def queue_stats(self, models: Sequence[str] = ()) -> tuple[scheduler_pb2.QueueStats, ...]:
        return self._run(self._admin.queue_stats(models))

    def set_tenant_weight(
        self, organization: str, weight: float, user: str = ""
    ) -> scheduler_pb2.SetTenantWeightResponse:
        return self._run(self._admin.set_tenant_weight(organization, weight, user))

    def dead_letters(self, model: str, *, page_size: int = 50) -> tuple[Request, ...]:
        return self._run(self._admin.dead_letters(model, page_size=page_size))

    def retry_dead_letter(self, request_id: str) -> Request:
        return self._run(self._admin.retry_dead_letter(request_id))

    def register_instance(
        self,
        instance_id: str,
        base_url: str,
        *,
        kind: str | int = "ollama",
        weight: float = 1.0,
        parallel: int = 0,
        roles: Sequence[str] = (),
        memory_budget_bytes: int = 0,
        max_loaded_models: int = 0,
        preload: Sequence[str] = (),
        allowed_models: Sequence[str] = (),
        external: bool = False,
        api_key_env: str = "",
    ) -> pool_pb2.InstanceStatus:
        return self._run(
            self._admin.register_instance(
                instance_id,
                base_url,
                kind=kind,
                weight=weight,
                parallel=parallel,
                roles=roles,
                memory_budget_bytes=memory_budget_bytes,
                max_loaded_models=max_loaded_models,
                preload=preload,
                allowed_models=allowed_models,
                external=external,
                api_key_env=api_key_env,
            )
        )

    def deregister_instance(self, instance_id: str) -> None:
        self._run(self._admin.deregister_instance(instance_id))

    def drain_instance(self, instance_id: str, drain: bool = True) -> pool_pb2.InstanceStatus:
        return self._run(self._admin.drain_instance(instance_id, drain))

    def set_instance_weight(self, instance_id: str, weight: float) -> pool_pb2.InstanceStatus:
        return self._run(self._admin.set_instance_weight(instance_id, weight))

    def reset_circuit(self, instance_id: str, model: str = "") -> pool_pb2.InstanceStatus:
        return self._run(self._admin.reset_circuit(instance_id, model))

    def load_model(
        self, instance_id: str, model: str, *, keep_alive: float | timedelta | None = None
    ) -> pool_pb2.InstanceStatus:
        return self._run(self._admin.load_model(instance_id, model, keep_alive=keep_alive))

    def unload_model(self, instance_id: str, model: str) -> pool_pb2.InstanceStatus:
        return self._run(self._admin.unload_model(instance_id, model))


class UsherClient:
    """The blocking twin of ``AsyncUsherClient``: same arguments, same methods."""

    def __init__(
        self,
        scheduler_address: str | None = None,
        notifier_address: str | None = None,
        *,
        pool_address: str | None = None,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 10.0,
        stream_timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._client = AsyncUsherClient(
            scheduler_address,
            notifier_address,
            pool_address=pool_address,
            token=token,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            credentials=credentials,
            timeout=timeout,
            stream_timeout=stream_timeout,
            retry=retry,
            channel_options=channel_options,
        )
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

    def submit(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessageLike] | None = None,
        embed: Sequence[str] | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Submission:
        return self.run(
            self._client.submit(model, prompt, messages=messages, embed=embed, **options)
        )

    def get(self, request_id: str) -> Request:
        return self.run(self._client.get(request_id))

    def list(
        self,
        *,
        model: str = "",
        states: Iterable[RequestState | str | int] = (),
        limit: int = 50,
    ) -> tuple[Request, ...]:
        return self.run(self._client.list(model=model, states=states, limit=limit))

    def cancel(self, request_id: str, reason: str = "") -> Request:
        return self.run(self._client.cancel(request_id, reason))

    def switch_provider(self, request_id: str) -> Request:
        return self.run(self._client.switch_provider(request_id))

    def watch(
        self, request_id: str, last_event_id: str = "", *, timeout: float | None = None
    ) -> Iterator[Update]:
        return self._runner.iterate(self._client.watch(request_id, last_event_id, timeout=timeout))

    def wait(self, request_id: str, *, timeout: float | None = None, check: bool = True) -> Request:
        return self.run(self._client.wait(request_id, timeout=timeout, check=check))

    def submit_and_wait(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessageLike] | None = None,
        embed: Sequence[str] | None = None,
        wait_timeout: float | None = None,
        check: bool = True,
        **options: Unpack[SubmitOptions],
    ) -> Request:
        return self.run(
            self._client.submit_and_wait(
                model,
                prompt,
                messages=messages,
                embed=embed,
                wait_timeout=wait_timeout,
                check=check,
                **options,
            )
        )

    def stream_tokens(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessageLike] | None = None,
        on_update: Callable[[Update], None] | None = None,
        on_restart: Callable[[], None] | None = None,
        **options: Unpack[SubmitOptions],
    ) -> SyncTokenStream:
        stream = self._client.stream_tokens(
            model, prompt, messages=messages, on_update=on_update, on_restart=on_restart, **options
        )
        return SyncTokenStream(stream, self._runner)

    def tokens(
        self,
        request_id: str,
        *,
        on_update: Callable[[Update], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> SyncTokenStream:
        stream = self._client.tokens(request_id, on_update=on_update, on_restart=on_restart)
        return SyncTokenStream(stream, self._runner)

    def queues(
        self, models: Sequence[str] = (), *, timeout: float | None = None
    ) -> Iterator[tuple[Badge, ...]]:
        return self._runner.iterate(self._client.queues(models, timeout=timeout))

    def list_instances(self) -> tuple[pool_pb2.InstanceStatus, ...]:
        return self.run(self._client.list_instances())

    def model_stats(self, models: Sequence[str] = ()) -> tuple[pool_pb2.ModelStats, ...]:
        return self.run(self._client.model_stats(models))
