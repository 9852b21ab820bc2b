"""The asyncio client: ``AsyncUsherClient``.

```python
async with AsyncUsherClient(token="alice-token") as usher:
    request = await usher.submit_and_wait("llama3.2:1b", "Why is the sky blue?")
    print(request.text)

    async for delta in usher.stream_tokens("llama3.2:1b", "Tell me a story"):
        print(delta, end="", flush=True)
```

Every call has a deadline (``timeout``, per attempt) and goes through the retry policy
(UNAVAILABLE with backoff and jitter, RESOURCE_EXHAUSTED after the server's RetryInfo).
``watch`` resumes a dropped stream from the last event id it delivered, so no update is
lost and none is delivered twice. Channels are opened lazily in the loop that first uses
them; use one client per event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict, TypeVar, Unpack

import grpc
import grpc.aio
from google.protobuf import duration_pb2, struct_pb2

from clients.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    OutputRestarted,
    RequestFailed,
    Unavailable,
    UsherError,
    error_from_rpc,
)
from clients.retry import RetryEvent, RetryPolicy, call_with_retry
from clients.types import (
    Badge,
    FallbackPolicy,
    Priority,
    Request,
    RequestState,
    Submission,
    Update,
    UpdateKind,
)
from usher.balancing import channel_target
from usher.ids import event_id_key
from usher.tls import KEEPALIVE, RECONNECT, ClientTls, ReloadingChannel
from usher.v1 import (
    notifier_pb2,
    notifier_pb2_grpc,
    pool_pb2,
    pool_pb2_grpc,
    request_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

__all__ = [
    "DEFAULT_NOTIFIER_ADDRESS",
    "DEFAULT_POOL_ADDRESS",
    "DEFAULT_SCHEDULER_ADDRESS",
    "AsyncAdmin",
    "AsyncUsherClient",
    "ChatMessageLike",
    "SubmitOptions",
    "TokenStream",
    "build_submit_request",
]

DEFAULT_SCHEDULER_ADDRESS = "127.0.0.1:50051"
DEFAULT_POOL_ADDRESS = "127.0.0.1:50052"
DEFAULT_NOTIFIER_ADDRESS = "127.0.0.1:50053"
#: ``submit_and_wait``'s Submit waits for the end at most this long (the most the API
#: allows); the call's deadline bounds it first.
AWAIT_RESULT_MAX_SECONDS = 600

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

#: A chat message: ``{"role": "user", "content": "hi"}``, ``("user", "hi")`` or the proto.
ChatMessageLike = Mapping[str, Any] | tuple[str, str] | request_pb2.ChatMessage

#: gRPC codes after which a Watch is resumed from the last event id instead of failing.
_RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,  # the server went away (our own cancel is asyncio's)
    grpc.StatusCode.DEADLINE_EXCEEDED,  # one stream's deadline; the watch goes on
}
_RESET_WORDS = ("rst_stream", "stream removed", "connection reset", "socket closed", "goaway")


class SubmitOptions(TypedDict, total=False):
    """Keyword options of ``submit`` (and of ``submit_and_wait`` and ``stream_tokens``)."""

    #: A system prompt (prepended as a system message for chats).
    system: str
    #: "" (free text), "json", or a JSON schema as text.
    format: str
    images: Sequence[str]
    priority: Priority | str | int
    #: A retried Submit with the same key returns the original request; a fresh uuid by
    #: default, so the SDK's own retries never queue a request twice.
    idempotency_key: str
    #: How long the request may wait in the queue (seconds or a timedelta).
    queue_timeout: float | timedelta
    #: Longest the request may run once started (the serving instance's limit caps it).
    request_timeout: float | timedelta
    fallback: FallbackPolicy | str | int
    #: After this the answer is useless: an instant, or seconds / a timedelta from now.
    deadline: datetime | timedelta | float
    labels: Mapping[str, str]
    temperature: float
    seed: int
    #: Most tokens to generate.
    num_predict: int
    num_ctx: int
    top_p: float
    top_k: int
    stop: Sequence[str]
    #: Any other model-server option, passed through untouched.
    options: Mapping[str, Any]
    #: W3C trace context; taken from the current OpenTelemetry span when not given.
    traceparent: str
    #: Deadline of each Submit attempt, seconds.
    timeout: float
    #: Only the result is wanted: the output is not stored token by token while it runs
    #: (less work per token in the queue's store); watchers see its states and the result
    #: at the end. ``submit_and_wait`` sets it unless given False.
    result_only: bool


def _duration(value: float | timedelta) -> duration_pb2.Duration:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    out = duration_pb2.Duration()
    out.FromMilliseconds(round(seconds * 1000))
    return out


def _chat_message(message: ChatMessageLike) -> request_pb2.ChatMessage:
    if isinstance(message, request_pb2.ChatMessage):
        return message
    if isinstance(message, tuple):
        role, content = message
        return request_pb2.ChatMessage(role=role, content=content)
    return request_pb2.ChatMessage(
        role=str(message.get("role", "user")),
        content=str(message.get("content", "")),
        images=list(message.get("images", ())),
    )


def _current_traceparent() -> str:
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - opentelemetry-api is a dependency
        return ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent", "")


def _bad(field: str, problem: str) -> InvalidArgument:
    """A client-side INVALID_ARGUMENT, shaped like the server's."""
    return InvalidArgument(
        f"{field}: {problem}",
        code=grpc.StatusCode.INVALID_ARGUMENT,
        field_violations=(FieldViolation(field, problem),),
    )


_P = TypeVar("_P", Priority, FallbackPolicy)


def _parse(cls: type[_P], value: _P | str | int, field: str) -> _P:
    try:
        return cls.parse(value)
    except ValueError as exc:
        raise _bad(field, str(exc)) from None


def build_submit_request(
    model: str,
    prompt: str | None = None,
    *,
    messages: Sequence[ChatMessageLike] | None = None,
    embed: Sequence[str] | None = None,
    **options: Unpack[SubmitOptions],
) -> scheduler_pb2.SubmitRequest:
    """The SubmitRequest for ``submit``'s arguments: exactly one of ``prompt`` (generate),
    ``messages`` (chat) or ``embed`` (embeddings)."""
    given = [
        name
        for name, value in (("prompt", prompt), ("messages", messages), ("embed", embed))
        if value is not None
    ]
    if len(given) != 1:
        raise _bad(
            "input",
            f"only one of prompt, messages or embed may be given (got {', '.join(given)})"
            if given
            else "one of prompt, messages or embed is required",
        )
    request = scheduler_pb2.SubmitRequest(
        model=model,
        idempotency_key=options.get("idempotency_key") or uuid.uuid4().hex,
        labels=dict(options.get("labels", {})),
        result_only=bool(options.get("result_only", False)),
    )
    _set_input(request, prompt, messages, embed, options)
    _set_controls(request, options)
    _set_generation(request.options, options)
    if not request.options.ListFields():
        request.ClearField("options")
    request.traceparent = options.get("traceparent") or _current_traceparent()
    return request


def _set_input(
    request: scheduler_pb2.SubmitRequest,
    prompt: str | None,
    messages: Sequence[ChatMessageLike] | None,
    embed: Sequence[str] | None,
    options: SubmitOptions,
) -> None:
    """The request's one input: a generate prompt, chat messages or texts to embed."""
    system = options.get("system", "")
    if prompt is not None:
        request.generate.CopyFrom(
            request_pb2.GenerateInput(
                prompt=prompt,
                system=system,
                format=options.get("format", ""),
                images=list(options.get("images", ())),
            )
        )
    elif messages is not None:
        chat = [_chat_message(m) for m in messages]
        if system:
            chat.insert(0, request_pb2.ChatMessage(role="system", content=system))
        if options.get("images") and chat:
            chat[-1].images.extend(options.get("images", ()))
        request.chat.CopyFrom(
            request_pb2.ChatInput(messages=chat, format=options.get("format", ""))
        )
    elif embed is not None:
        request.embed.CopyFrom(request_pb2.EmbedInput(input=list(embed)))


def _set_controls(request: scheduler_pb2.SubmitRequest, options: SubmitOptions) -> None:
    """Priority, fallback and the time limits."""
    if "priority" in options:
        request.priority = _parse(Priority, options["priority"], "priority").value
    if "fallback" in options:
        request.fallback_policy = _parse(
            FallbackPolicy, options["fallback"], "fallback_policy"
        ).value
    if "queue_timeout" in options:
        request.queue_timeout.CopyFrom(_duration(options["queue_timeout"]))
    if "request_timeout" in options:
        request.request_timeout.CopyFrom(_duration(options["request_timeout"]))
    if "deadline" in options:
        deadline = options["deadline"]
        if not isinstance(deadline, datetime):
            delta = deadline if isinstance(deadline, timedelta) else timedelta(seconds=deadline)
            deadline = datetime.now(UTC) + delta
        request.deadline.FromMilliseconds(round(deadline.timestamp() * 1000))


def _set_generation(generation: request_pb2.GenerationOptions, options: SubmitOptions) -> None:
    """Sampling options; anything untyped rides in ``extra``."""
    for name in ("temperature", "top_p"):
        if name in options:
            setattr(generation, name, float(options[name]))
    for name in ("seed", "num_predict", "num_ctx", "top_k"):
        if name in options:
            setattr(generation, name, int(options[name]))  # type: ignore[literal-required]
    generation.stop.extend(options.get("stop", ()))
    if options.get("options"):
        extra = struct_pb2.Struct()
        extra.update(dict(options.get("options", {})))
        generation.extra.CopyFrom(extra)


def _already_seen(event_id: str, last: str) -> bool:
    if not last:
        return False
    new, old = event_id_key(event_id), event_id_key(last)
    if new is None or old is None:
        return event_id == last
    return new <= old


def _resumable(error: UsherError) -> bool:
    """A dropped or expired stream (resume it), rather than an answer (raise it)."""
    if error.code in _RESUMABLE:
        return True
    if error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return any(word in error.message.lower() for word in _RESET_WORDS)
    return False


class _Reconnects:
    """The budget of one stream's reconnects: backoff grows while attempts fail and resets
    as soon as a message arrives; gives up after ``max_total_wait`` without one."""

    def __init__(self, method: str, policy: RetryPolicy) -> None:
        self.method = method
        self.policy = policy
        self.streak = 0
        self.failing_since = 0.0

    def progress(self) -> None:
        self.streak = 0

    async def wait(self, error: UsherError, lasted: float) -> None:
        """Before the next attempt, after one that ``lasted`` seconds ended with ``error``."""
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED and lasted >= 1.0:
            # A stream that ran out its own deadline was healthy: reconnect at once.
            self.streak = 0
            return
        now = time.monotonic()
        if self.streak == 0:
            self.failing_since = now
        self.streak += 1
        delay = self.policy.backoff(self.streak)
        if now - self.failing_since + delay > self.policy.max_total_wait:
            raise error
        if self.policy.on_retry is not None:
            self.policy.on_retry(RetryEvent(self.method, self.streak, delay, error))
        await asyncio.sleep(delay)


class AsyncUsherClient:
    """Talks to the Scheduler (submit, get, list, cancel, switch), the Notifier (watch,
    queue badges) and, when given an address, the Pool (instances, model stats).

    Addresses and token default to ``USHER_SCHEDULER_ADDRESS``, ``USHER_NOTIFIER_ADDRESS``,
    ``USHER_POOL_ADDRESS`` and ``USHER_TOKEN``. TLS: pass ``root_certificates`` (PEM bytes;
    ``private_key`` and ``certificate_chain`` for mutual TLS) or ready ``credentials``;
    otherwise ``USHER_TLS_CA`` (and ``USHER_TLS_CLIENT_CERT`` / ``USHER_TLS_CLIENT_KEY``)
    turn it on, as for the services, and renewed files are used from the next call on.
    """

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
        env = os.environ
        self.scheduler_address = scheduler_address or env.get(
            "USHER_SCHEDULER_ADDRESS", DEFAULT_SCHEDULER_ADDRESS
        )
        self.notifier_address = notifier_address or env.get(
            "USHER_NOTIFIER_ADDRESS", DEFAULT_NOTIFIER_ADDRESS
        )
        #: "" when no Pool address was given or set: pool methods raise then.
        self.pool_address = (
            pool_address if pool_address is not None else env.get("USHER_POOL_ADDRESS", "")
        )
        self.token = token if token is not None else env.get("USHER_TOKEN", "")
        #: Deadline of each unary call attempt, seconds.
        self.timeout = timeout
        #: Deadline of one Watch stream or AwaitResult call; a longer watch or wait
        #: reconnects (and resumes) after it.
        self.stream_timeout = stream_timeout
        #: False once the Notifier answered AwaitResult UNIMPLEMENTED (older than this
        #: client): ``wait`` then watches for the final update.
        self._await_result = True
        self.retry = retry or RetryPolicy()
        if credentials is None and root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
        #: TLS files from USHER_TLS_*: channels follow their renewals (ReloadingChannel).
        self._tls_files: ClientTls | None = None
        if credentials is None and env.get("USHER_TLS_CA"):
            self._tls_files = ClientTls.from_env()
            credentials = self._tls_files.credentials() if self._tls_files else None
        self._credentials = credentials
        self._channel_options: list[tuple[str, Any]] = [
            # Come back quickly after a service restarts; notice a vanished one by pings.
            *RECONNECT,
            *KEEPALIVE,
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            *channel_options,
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.admin = AsyncAdmin(self)

    # -- plumbing ------------------------------------------------------------------------

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            # Every replica the address names, calls round robin (usher.balancing).
            target, balancing = channel_target(address)
            options = [*self._channel_options, *balancing]
            if self._tls_files is not None:
                channel = ReloadingChannel(target, self._tls_files, options, ())
            elif self._credentials is None:
                channel = grpc.aio.insecure_channel(target, options=options)
            else:
                channel = grpc.aio.secure_channel(target, self._credentials, options=options)
            self._channels[address] = channel
        return channel

    @property
    def _scheduler(self) -> scheduler_pb2_grpc.SchedulerServiceAsyncStub:
        return scheduler_pb2_grpc.SchedulerServiceStub(self._channel(self.scheduler_address))

    @property
    def _scheduler_admin(self) -> scheduler_pb2_grpc.SchedulerAdminServiceAsyncStub:
        return scheduler_pb2_grpc.SchedulerAdminServiceStub(self._channel(self.scheduler_address))

    @property
    def _notifier(self) -> notifier_pb2_grpc.NotifierServiceAsyncStub:
        return notifier_pb2_grpc.NotifierServiceStub(self._channel(self.notifier_address))

    def _pool_channel(self) -> grpc.aio.Channel:
        if not self.pool_address:
            raise UsherError("no Pool address: pass pool_address or set USHER_POOL_ADDRESS")
        return self._channel(self.pool_address)

    @property
    def _pool(self) -> pool_pb2_grpc.PoolServiceAsyncStub:
        return pool_pb2_grpc.PoolServiceStub(self._pool_channel())

    @property
    def _pool_admin(self) -> pool_pb2_grpc.PoolAdminServiceAsyncStub:
        return pool_pb2_grpc.PoolAdminServiceStub(self._pool_channel())

    def _metadata(self, traceparent: str = "") -> tuple[tuple[str, str], ...]:
        metadata: list[tuple[str, str]] = []
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        traceparent = traceparent or _current_traceparent()
        if traceparent:
            metadata.append(("traceparent", traceparent))
        return tuple(metadata)

    async def _unary(
        self,
        name: str,
        method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
        request: _Req,
        *,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        traceparent: str = "",
    ) -> _Resp:
        metadata = self._metadata(traceparent)
        deadline = timeout if timeout is not None else self.timeout

        async def attempt() -> _Resp:
            return await method(request, metadata=metadata, timeout=deadline)

        return await call_with_retry(name, attempt, retry or self.retry)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncUsherClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- requests ------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessageLike] | None = None,
        embed: Sequence[str] | None = None,
        **options: Unpack[SubmitOptions],
    ) -> Submission:
        """Queue a request: a ``prompt`` (generate), chat ``messages`` or texts to ``embed``.

        Retries are safe: every attempt carries the same idempotency key. Raises
        ``InvalidArgument`` (with ``field_violations``) for bad input and
        ``ResourceExhausted`` when the queue stayed full for longer than the retry budget.
        """
        request = build_submit_request(model, prompt, messages=messages, embed=embed, **options)
        return await self._submit(request, options.get("timeout"))

    async def _submit(
        self, request: scheduler_pb2.SubmitRequest, timeout: float | None
    ) -> Submission:
        response = await self._unary(
            "Submit",
            self._scheduler.Submit,
            request,
            timeout=timeout,
            traceparent=request.traceparent,
        )
        return Submission.from_proto(response)

    async def submit_batch(
        self, model: str, prompts: Sequence[str], **options: Unpack[SubmitOptions]
    ) -> tuple[Submission, ...]:
        """Queue one generate request per prompt, all for ``model`` and with the same
        options, in one call: every one is queued (in order, each with its own id) or none
        is. Each carries its own idempotency key, so the SDK's retries are safe."""
        if "idempotency_key" in options:
            raise ValueError("each request of a batch gets its own idempotency key")
        request = scheduler_pb2.SubmitBatchRequest(
            requests=[build_submit_request(model, prompt, **options) for prompt in prompts]
        )
        response = await self._unary(
            "SubmitBatch", self._scheduler.SubmitBatch, request, timeout=options.get("timeout")
        )
        return tuple(Submission.from_proto(r) for r in response.responses)

    async def get(self, request_id: str) -> Request:
        response = await self._unary(
            "Get", self._scheduler.Get, scheduler_pb2.GetRequest(id=request_id)
        )
        return Request.from_proto(response.request)

    async def list(
        self,
        *,
        model: str = "",
        states: Iterable[RequestState | str | int] = (),
        limit: int = 50,
    ) -> tuple[Request, ...]:
        """The caller's requests, newest first (at most ``limit``, across pages)."""
        wanted = [RequestState.parse(s).value for s in states]
        found: list[Request] = []
        token = ""
        while len(found) < limit:
            response = await self._unary(
                "List",
                self._scheduler.List,
                scheduler_pb2.ListRequest(
                    page_size=min(1000, max(1, limit - len(found))),
                    page_token=token,
                    states=wanted,
                    model=model,
                ),
            )
            found.extend(Request.from_proto(r) for r in response.requests)
            token = response.next_page_token
            if not token:
                break
        return tuple(found[:limit])

    async def cancel(self, request_id: str, reason: str = "") -> Request:
        """Cancel a queued (removed at once) or running (stops shortly) request."""
        response = await self._unary(
            "Cancel",
            self._scheduler.Cancel,
            scheduler_pb2.CancelRequest(id=request_id, reason=reason),
        )
        return Request.from_proto(response.request)

    async def switch_provider(self, request_id: str) -> Request:
        """Move a queued request to the external provider now."""
        response = await self._unary(
            "SwitchProvider",
            self._scheduler.SwitchProvider,
            scheduler_pb2.SwitchProviderRequest(id=request_id),
        )
        return Request.from_proto(response.request)

    # -- live status ---------------------------------------------------------------------

    async def watch(
        self,
        request_id: str,
        last_event_id: str = "",
        *,
        timeout: float | None = None,
        model: str = "",
        final_only: bool = False,
    ) -> AsyncGenerator[Update, None]:
        """Every update of a request until it ends (the first is its status now, unless
        resuming after ``last_event_id``). A dropped stream is resumed from the last event
        delivered: nothing is missed and no event is delivered twice. ``timeout`` bounds
        the whole watch (None: until the request ends). ``model``, the request's model when
        known, spares the Notifier a lookup. ``final_only``: the last update alone (the
        request as it ended), no updates on the way."""
        last = last_event_id
        reconnects = _Reconnects("Watch", self.retry)
        ends_at = None if timeout is None else time.monotonic() + timeout
        while True:
            attempt_timeout = self._attempt_timeout(ends_at)
            if attempt_timeout <= 0:
                raise DeadlineExceeded(f"watching {request_id} took longer than {timeout}s")
            attempt_started = time.monotonic()
            call = self._notifier.Watch(
                notifier_pb2.WatchRequest(
                    id=request_id, last_event_id=last, model=model, final_only=final_only
                ),
                metadata=self._metadata(),
                timeout=attempt_timeout,
            )
            error: UsherError
            try:
                async for response in call:
                    reconnects.progress()
                    model = response.request.model
                    if response.event_id:
                        if _already_seen(response.event_id, last):
                            continue
                        last = response.event_id
                    update = Update.from_proto(response)
                    yield update
                    if update.is_terminal:
                        return
                error = Unavailable("the watch stream ended before the request did")
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not _resumable(error):
                    raise error from None
            finally:
                call.cancel()
            await reconnects.wait(error, time.monotonic() - attempt_started)

    async def wait(
        self,
        request_id: str,
        *,
        timeout: float | None = None,
        check: bool = True,
        model: str = "",
    ) -> Request:
        """The request once it has ended. With ``check``, raises ``RequestFailed`` unless
        it COMPLETED."""
        final = await self._final(request_id, timeout, model)
        if check and final.state != RequestState.COMPLETED:
            raise RequestFailed(final)
        return final

    def _attempt_timeout(self, ends_at: float | None) -> float:
        """One attempt's deadline in seconds: ``stream_timeout``, or what is left before
        ``ends_at`` (nothing left: 0 or less)."""
        if ends_at is None:
            return self.stream_timeout
        return min(self.stream_timeout, ends_at - time.monotonic())

    async def _final(self, request_id: str, timeout: float | None, model: str) -> Request:
        """The request as it ended, by AwaitResult (one unary call, made again after each
        ``stream_timeout`` and a dropped connection), or by a final-only watch from a
        Notifier older than AwaitResult."""
        reconnects = _Reconnects("AwaitResult", self.retry)
        ends_at = None if timeout is None else time.monotonic() + timeout
        while self._await_result:
            attempt_timeout = self._attempt_timeout(ends_at)
            if attempt_timeout <= 0:
                raise DeadlineExceeded(f"waiting for {request_id} took longer than {timeout}s")
            attempt_started = time.monotonic()
            try:
                reply = await self._notifier.AwaitResult(
                    notifier_pb2.AwaitResultRequest(id=request_id, model=model),
                    metadata=self._metadata(),
                    timeout=attempt_timeout,
                )
                return Update.from_proto(reply.update).request
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if error.code == grpc.StatusCode.UNIMPLEMENTED:
                    self._await_result = False
                    break
                if not _resumable(error):
                    raise error from None
            await reconnects.wait(error, time.monotonic() - attempt_started)
        final: Request | None = None
        async for update in self.watch(request_id, timeout=timeout, model=model, final_only=True):
            final = update.request
        if final is None:  # pragma: no cover - watch always ends on a terminal update
            final = await self.get(request_id)
        return final

    async def submit_and_wait(
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
        """Submit, then wait for the result: the final request (``.text``, ``.result``,
        ``.usage``). Raises ``RequestFailed`` if it did not complete (unless ``check`` is
        false). The request is ``result_only`` unless ``result_only=False`` is given (for
        other watchers of it who want its output as it comes)."""
        options.setdefault("result_only", True)
        request = build_submit_request(model, prompt, messages=messages, embed=embed, **options)
        # A request the Scheduler starts at once comes back ended, with no wait to follow
        # (within the Submit's deadline: a longer one is waited for on the Notifier).
        if request.result_only:
            request.await_result.FromSeconds(AWAIT_RESULT_MAX_SECONDS)
        submission = await self._submit(request, options.get("timeout"))
        if submission.request.state.is_terminal:
            if check and submission.request.state != RequestState.COMPLETED:
                raise RequestFailed(submission.request)
            return submission.request
        return await self.wait(
            submission.id, timeout=wait_timeout, check=check, model=submission.request.model
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
    ) -> TokenStream:
        """Submit, then iterate over the answer's text as it is generated. The pieces joined
        are the final ``request.text``. See ``TokenStream`` for restarts and failures."""

        async def start() -> str:
            stream.submission = await self.submit(model, prompt, messages=messages, **options)
            return stream.submission.id

        stream = TokenStream(self, start, on_update=on_update, on_restart=on_restart)
        return stream

    def tokens(
        self,
        request_id: str,
        *,
        on_update: Callable[[Update], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> TokenStream:
        """The text of an existing request as it is generated (from the start)."""

        async def start() -> str:
            return request_id

        return TokenStream(self, start, on_update=on_update, on_restart=on_restart)

    async def queues(
        self, models: Sequence[str] = (), *, timeout: float | None = None
    ) -> AsyncGenerator[tuple[Badge, ...], None]:
        """Queue badges of ``models`` (all known models when empty): now, then on every
        change. Reconnects by itself; ``timeout`` bounds the whole subscription."""
        reconnects = _Reconnects("WatchQueues", self.retry)
        ends_at = None if timeout is None else time.monotonic() + timeout
        while True:
            attempt_timeout = self._attempt_timeout(ends_at)
            if attempt_timeout <= 0:
                return
            attempt_started = time.monotonic()
            call = self._notifier.WatchQueues(
                notifier_pb2.WatchQueuesRequest(models=list(models)),
                metadata=self._metadata(),
                timeout=attempt_timeout,
            )
            error: UsherError
            try:
                async for response in call:
                    reconnects.progress()
                    yield tuple(Badge.from_proto(b) for b in response.badges)
                error = Unavailable("the queue stream ended")
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not _resumable(error):
                    raise error from None
                if ends_at is not None and time.monotonic() >= ends_at:
                    return
            finally:
                call.cancel()
            await reconnects.wait(error, time.monotonic() - attempt_started)

    # -- the fleet (needs a Pool address) --------------------------------------------------

    async def list_instances(self) -> tuple[pool_pb2.InstanceStatus, ...]:
        """Every model-server instance: health, circuit, loaded models, active / parallel."""
        response = await self._unary(
            "ListInstances", self._pool.ListInstances, pool_pb2.ListInstancesRequest()
        )
        return tuple(response.instances)

    async def model_stats(self, models: Sequence[str] = ()) -> tuple[pool_pb2.ModelStats, ...]:
        response = await self._unary(
            "GetModelStats",
            self._pool.GetModelStats,
            pool_pb2.GetModelStatsRequest(models=list(models)),
        )
        return tuple(response.stats)


class TokenStream:
    """Async iterator of one request's text deltas; ``"".join(pieces) == request.text``.

    After iterating, ``request`` is the final request. ``submission`` is Submit's answer
    (None for ``tokens(id)``), ``request_id`` is known after the first step. When the
    request ends without completing, iteration raises ``RequestFailed``. When it goes back
    to the queue after output had started (its model server failed), the text so far is
    void: ``on_restart`` is called and the new attempt's text follows, or, without
    ``on_restart``, ``OutputRestarted`` is raised.
    """

    def __init__(
        self,
        client: AsyncUsherClient,
        start: Callable[[], Awaitable[str]],
        *,
        on_update: Callable[[Update], None] | None = None,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._start = start
        self._on_update = on_update
        self._on_restart = on_restart
        self.submission: Submission | None = None
        self.request_id: str | None = None
        self.request: Request | None = None
        self.last_event_id = ""
        self._iterator = self._run()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> str:
        return await self._iterator.__anext__()

    async def aclose(self) -> None:
        await self._iterator.aclose()

    async def cancel(self, reason: str = "") -> Request | None:
        """Cancel the request (if it was submitted) and stop iterating."""
        await self.aclose()
        if self.request_id is None:
            return None
        return await self._client.cancel(self.request_id, reason)

    async def _run(self) -> AsyncGenerator[str, None]:
        self.request_id = await self._start()
        emitted: list[str] = []
        async for update in self._client.watch(self.request_id):
            self.last_event_id = update.event_id or self.last_event_id
            if self._on_update is not None:
                self._on_update(update)
            if update.kind == UpdateKind.REQUEUED and emitted:
                if self._on_restart is None:
                    raise OutputRestarted(self.request_id, self.last_event_id)
                self._on_restart()
                emitted = []
            if update.text_delta:
                emitted.append(update.text_delta)
                yield update.text_delta
            if update.is_terminal:
                self.request = update.request
        final = self.request
        if final is None:  # pragma: no cover - watch always ends on a terminal update
            return
        if final.state != RequestState.COMPLETED:
            raise RequestFailed(final)
        text = "".join(emitted)
        if len(final.text) > len(text) and final.text.startswith(text):
            yield final.text[len(text) :]  # anything a dropped stream could not replay


class AsyncAdmin:
    """Operator calls (the token needs the admin role): queues on the Scheduler, the fleet
    on the Pool."""

    def __init__(self, client: AsyncUsherClient) -> None:
        self._client = client

    async def _instance(
        self, name: str, request: Any, timeout: float | None = None
    ) -> pool_pb2.InstanceStatus:
        """A PoolAdminService call that answers with the instance's status."""
        c = self._client
        response = await c._unary(name, getattr(c._pool_admin, name), request, timeout=timeout)
        instance: pool_pb2.InstanceStatus = response.instance
        return instance

    async def update_queue_config(
        self,
        model: str,
        *,
        max_queue_size: int | None = None,
        queue_timeout: float | timedelta | None = None,
        max_attempts: int | None = None,
        lease_duration: float | timedelta | None = None,
        parallel: int | None = None,
    ) -> scheduler_pb2.QueueConfig:
        """Change a model's queue limits; what is not given keeps its value."""
        request = scheduler_pb2.UpdateQueueConfigRequest(model=model)
        if max_queue_size is not None:
            request.max_queue_size = max_queue_size
        if max_attempts is not None:
            request.max_attempts = max_attempts
        if parallel is not None:
            request.parallel = parallel
        if queue_timeout is not None:
            request.queue_timeout.CopyFrom(_duration(queue_timeout))
        if lease_duration is not None:
            request.lease_duration.CopyFrom(_duration(lease_duration))
        c = self._client
        response = await c._unary(
            "UpdateQueueConfig", c._scheduler_admin.UpdateQueueConfig, request
        )
        return response.config

    async def queue_stats(self, models: Sequence[str] = ()) -> tuple[scheduler_pb2.QueueStats, ...]:
        c = self._client
        response = await c._unary(
            "GetQueueStats",
            c._scheduler_admin.GetQueueStats,
            scheduler_pb2.GetQueueStatsRequest(models=list(models)),
        )
        return tuple(response.stats)

    async def set_tenant_weight(
        self, organization: str, weight: float, user: str = ""
    ) -> scheduler_pb2.SetTenantWeightResponse:
        """A tenant's share relative to weight 1.0; no user: the organization's default."""
        c = self._client
        return await c._unary(
            "SetTenantWeight",
            c._scheduler_admin.SetTenantWeight,
            scheduler_pb2.SetTenantWeightRequest(
                tenant=request_pb2.Tenant(user=user, organization=organization), weight=weight
            ),
        )

    async def dead_letters(self, model: str, *, page_size: int = 50) -> tuple[Request, ...]:
        c = self._client
        response = await c._unary(
            "ListDeadLetters",
            c._scheduler_admin.ListDeadLetters,
            scheduler_pb2.ListDeadLettersRequest(model=model, page_size=page_size),
        )
        return tuple(Request.from_proto(r) for r in response.requests)

    async def retry_dead_letter(self, request_id: str) -> Request:
        """Put a dead-lettered request back at its original place in its queue."""
        c = self._client
        response = await c._unary(
            "RetryDeadLetter",
            c._scheduler_admin.RetryDeadLetter,
            scheduler_pb2.RetryDeadLetterRequest(id=request_id),
        )
        return Request.from_proto(response.request)

    async def register_instance(
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
        kinds = {"ollama": pool_pb2.INSTANCE_KIND_OLLAMA, "openai": pool_pb2.INSTANCE_KIND_OPENAI}
        if isinstance(kind, str):
            if kind.lower() not in kinds:
                raise _bad("config.kind", "must be ollama or openai")
            kind = kinds[kind.lower()]
        config = pool_pb2.InstanceConfig(
            id=instance_id,
            base_url=base_url,
            kind=kind,  # type: ignore[arg-type]
            weight=weight,
            roles=list(roles),
            parallel=parallel,
            memory_budget_bytes=memory_budget_bytes,
            max_loaded_models=max_loaded_models,
            preload=list(preload),
            allowed_models=list(allowed_models),
            external=external,
            api_key_env=api_key_env,
        )
        return await self._instance(
            "RegisterInstance", pool_pb2.RegisterInstanceRequest(config=config)
        )

    async def deregister_instance(self, instance_id: str) -> None:
        c = self._client
        await c._unary(
            "DeregisterInstance",
            c._pool_admin.DeregisterInstance,
            pool_pb2.DeregisterInstanceRequest(id=instance_id),
        )

    async def drain_instance(self, instance_id: str, drain: bool = True) -> pool_pb2.InstanceStatus:
        """Stop granting new slots on an instance (``drain=False`` resumes it)."""
        request = pool_pb2.DrainInstanceRequest(id=instance_id, drain=drain)
        return await self._instance("DrainInstance", request)

    async def set_instance_weight(self, instance_id: str, weight: float) -> pool_pb2.InstanceStatus:
        request = pool_pb2.SetInstanceWeightRequest(id=instance_id, weight=weight)
        return await self._instance("SetInstanceWeight", request)

    async def reset_circuit(self, instance_id: str, model: str = "") -> pool_pb2.InstanceStatus:
        request = pool_pb2.ResetCircuitRequest(id=instance_id, model=model)
        return await self._instance("ResetCircuit", request)

    async def load_model(
        self, instance_id: str, model: str, *, keep_alive: float | timedelta | None = None
    ) -> pool_pb2.InstanceStatus:
        request = pool_pb2.LoadModelRequest(id=instance_id, model=model)
        if keep_alive is not None:
            request.keep_alive.CopyFrom(_duration(keep_alive))
        # Loading takes as long as the model server needs: a generous deadline.
        return await self._instance("LoadModel", request, max(self._client.timeout, 120.0))

    async def pull_model(
        self, model: str, instance_id: str = ""
    ) -> AsyncGenerator[pool_pb2.PullModelResponse, None]:
        """Pull ``model`` onto one instance or (no id) every local Ollama instance: Ollama's
        progress lines, each naming its instance."""
        c = self._client
        call = c._pool_admin.PullModel(
            pool_pb2.PullModelRequest(id=instance_id, model=model),
            metadata=c._metadata(),
            timeout=c.stream_timeout,
        )
        try:
            async for line in call:
                yield line
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def unload_model(self, instance_id: str, model: str) -> pool_pb2.InstanceStatus:
        request = pool_pb2.UnloadModelRequest(id=instance_id, model=model)
        return await self._instance("UnloadModel", request)
