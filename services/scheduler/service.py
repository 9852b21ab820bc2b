"""gRPC handlers of the scheduler: authenticate, validate, call the store, shape the answer.

Errors are raised as usher.errors types; the shared interceptor turns them into statuses.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

from opentelemetry.trace import SpanKind

from services.scheduler import admission
from services.scheduler.quotas import LIVE_GRACE_MS, Admission, Limits, Quotas, StorageCharge
from services.scheduler.reaper import settle_ended
from services.scheduler.settings import SchedulerSettings
from services.scheduler.store import (
    TENANT_LISTING_MAX,
    NewRequest,
    QueueStore,
    SubmitOutcome,
)
from usher import keys, metrics, tracing
from usher.audit import AuditLog
from usher.auth import Authenticator, Principal
from usher.errors import (
    AlreadyFinished,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from usher.grpc_types import Context
from usher.ids import REQUEST_ID_METADATA, is_request_id, new_request_id
from usher.queue import fairness, records
from usher.queue.records import StoredRequest
from usher.scripts import ScriptCall
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["SchedulerAdminServicer", "SchedulerServicer"]

_STATE_NAMES: dict[int, str] = {
    v: k.removeprefix("REQUEST_STATE_") for k, v in request_pb2.RequestState.items()
}
_MAX_PAGE = 1000
#: Charged to a new request's tenant beyond its payload and labels: its metadata fields,
#: first events, index and listing entries (settled to the real figure when it ends).
ADMISSION_OVERHEAD_BYTES = 2048
#: What a Submit with ``await_result`` leaves of its call's deadline for the answer's way back.
AWAIT_RESULT_MARGIN_SECONDS = 0.25
_SUBMIT_RESULTS = {
    "queued": "queued",
    "exists": "queued",
    "dedup": "deduplicated",
    "replayed": "replayed",
    "full": "rejected",
}


def _awaited(model: str, outcome: str) -> None:
    metrics.SUBMIT_AWAITED.labels(model, outcome).inc()


def _check_id(request_id: str) -> None:
    if not is_request_id(request_id):
        raise InvalidArgument([FieldViolation("id", f"{request_id[:40]!r} is not a request id")])


def _page_offset(token: str) -> int:
    """The offset a List page token stands for; INVALID_ARGUMENT for anything this server
    would not have given out (garbage, negative, beyond the listing's length)."""
    if not token:
        return 0
    try:
        if len(token) > 32:
            raise ValueError("too long")
        offset = int(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        offset = -1
    if not 0 <= offset <= TENANT_LISTING_MAX:
        raise InvalidArgument([FieldViolation("page_token", "is not a token this server gave out")])
    return offset


class Expected(Protocol):
    """A Submit this replica's dispatcher was told of before its admission (it reserves a
    slot beside it): the enqueue goes through it, and ``end`` closes it however it ends.
    With ``await_end``, a request its enqueue's claim started here has its end told by
    ``ended`` (the request as it ended; None: it ended otherwise, the Notifier tells)."""

    ended: asyncio.Future[StoredRequest | None] | None

    async def enqueue(
        self, request: NewRequest, admission: ScriptCall | None = None, await_end: bool = False
    ) -> SubmitOutcome: ...

    def forget_end(self, request_id: str) -> None: ...

    def end(self) -> bool: ...


class _Handlers:
    def __init__(
        self,
        store: QueueStore,
        auth: Authenticator,
        settings: SchedulerSettings,
        quotas: Quotas,
        audit: AuditLog,
    ) -> None:
        self.store = store
        self.auth = auth
        self.settings = settings
        self.quotas = quotas
        self.audit = audit
        #: Called with the model, the request's fairness flow and its id when a request is
        #: queued (wakes local dispatchers, or a slot held for the flow).
        self.on_queued: Callable[[str, str, str], None] | None = None
        #: Called with the model when a Submit is about to be admitted and queued (a local
        #: dispatcher reserves a slot meanwhile, and claims beside the enqueue); its queued
        #: request is then told through the returned Expected, not ``on_queued``.
        self.expect: Callable[[str], Awaitable[Expected]] | None = None

    async def _model_fallback(self, model: str) -> int:
        """The model's default fallback policy (UpdateQueueConfig), 0 when it sets none."""
        return (await self.store.cached_config(model)).fallback

    def caller(self, context: Context) -> Principal:
        return self.auth.authenticate(context.invocation_metadata())

    async def view(
        self, stored: StoredRequest, state_override: int | None = None
    ) -> request_pb2.LlmRequest:
        averages, parallel = await self.store.model_averages(stored.model)
        return records.to_proto(stored, averages, parallel, state_override)

    async def owned(self, request_id: str, caller: Principal) -> StoredRequest:
        _check_id(request_id)
        stored = await self.store.get(request_id)
        if stored is None:
            raise NotFound(f"request {request_id} not found")
        if caller.tenant not in stored.owners and not caller.is_admin:
            raise PermissionDenied(f"request {request_id} belongs to another caller")
        return stored


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer, _Handlers):
    async def Submit(
        self, request: scheduler_pb2.SubmitRequest, context: Context
    ) -> scheduler_pb2.SubmitResponse:
        caller = self.caller(context)
        now = time.time()
        limits = admission.AdmissionLimits(
            self.settings.max_prompt_chars, self.settings.allowed_models
        )
        violations = admission.validate_submit(request, limits, now)
        if violations:
            raise InvalidArgument(violations)
        await self._refresh(request.model, caller)
        request.model = await self._served_name(request.model)
        expected = await self.expect(request.model) if self.expect is not None else None
        awaits = request.await_result.ToMilliseconds() / 1000
        try:
            tenant_limits = await self.quotas.limits_for(caller.organization, caller.user)
            new = await self._new_request(request, caller, tenant_limits, now)
            # The admission rides the enqueue's round trip where it can (one fewer per
            # Submit); else it goes first.
            checked = None
            if self.store.admission_rides:
                checked = await self._admission(new, tenant_limits)
            else:
                await self._admit(new, tenant_limits)
            with self._enqueue_span(new):
                # The trace continues from here when a dispatcher claims the request.
                traceparent = tracing.current_traceparent() or request.traceparent
                new = replace(new, traceparent=traceparent)
                if expected is not None:
                    outcome = await expected.enqueue(new, checked, await_end=awaits > 0)
                else:
                    outcome = await self.store.submit(new, admission=checked)
        finally:
            if expected is not None:
                expected.end()
        if outcome.status == "refused":
            self._check_admitted(new, tenant_limits, Quotas.verdict(outcome.admission))
            # Admitted, yet refused by a marker an earlier attempt of this Submit left (its
            # pipeline sent again): nothing was queued, so nothing stays charged.
            await self._refund([new], tenant_limits)
            raise Unavailable(f"request {new.id} was not queued; retry")
        await self._noted(request, new, outcome, caller, tenant_limits, told=expected is not None)
        if expected is not None and expected.ended is not None:
            try:
                ended = await self._end(
                    expected.ended, awaits, context, outcome.request_id, request.model
                )
            finally:
                expected.forget_end(outcome.request_id)
            if ended is not None:
                return scheduler_pb2.SubmitResponse(request=records.to_proto(ended))
        elif awaits > 0:
            _awaited(request.model, "not_started_here")
        # Built only now: a Submit answered with the end never needs it.
        return await self._answer(request, outcome)

    async def _end(
        self,
        ended: asyncio.Future[StoredRequest | None],
        longest: float,
        context: Context,
        request_id: str,
        model: str,
    ) -> StoredRequest | None:
        """The request as it ended (``ended``), when it ends here within ``longest`` seconds
        and the call's deadline (less a margin for the answer's way back); None otherwise.
        The id goes first, as initial metadata: a caller whose call breaks still knows what
        to wait for."""
        remaining = context.time_remaining()
        if remaining is not None:
            longest = min(longest, remaining - AWAIT_RESULT_MARGIN_SECONDS)
        if longest <= 0:
            _awaited(model, "no_time")
            return None
        await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
        try:
            async with asyncio.timeout(longest):
                stored = await ended
        except TimeoutError:
            _awaited(model, "timed_out")
            return None
        # None: it ended otherwise, or runs again; the Notifier tells its end.
        _awaited(model, "ended" if stored is not None else "ended_otherwise")
        return stored

    async def SubmitBatch(
        self, request: scheduler_pb2.SubmitBatchRequest, context: Context
    ) -> scheduler_pb2.SubmitBatchResponse:
        caller = self.caller(context)
        now = time.time()
        batch = list(request.requests)
        violations = admission.validate_batch(
            batch,
            admission.AdmissionLimits(self.settings.max_prompt_chars, self.settings.allowed_models),
            now,
        )
        if violations:
            raise InvalidArgument(violations)
        await self._refresh(batch[0].model, caller)
        served = await self._served_name(batch[0].model)
        for item in batch:
            item.model = served
        tenant_limits = await self.quotas.limits_for(caller.organization, caller.user)
        news = [await self._new_request(r, caller, tenant_limits, now) for r in batch]
        admitted: list[NewRequest] = []
        try:
            for new in news:  # every one is admitted by the quotas, or none stays charged
                await self._admit(new, tenant_limits)
                admitted.append(new)
            with self._enqueue_span(news[0]):
                traceparent = tracing.current_traceparent()
                outcomes = await self.store.submit_batch(
                    [replace(n, traceparent=n.traceparent or traceparent) for n in news]
                )
        except BaseException:
            await self._refund(admitted, tenant_limits)
            raise
        if isinstance(outcomes, int):
            await self._refund(admitted, tenant_limits)
            metrics.REJECTED.labels(batch[0].model, "queue_full").inc(len(batch))
            raise await self._queue_full(batch[0].model, outcomes)
        responses = []
        for r, n, o in zip(batch, news, outcomes, strict=True):
            await self._noted(r, n, o, caller, tenant_limits)
            responses.append(await self._answer(r, o))
        return scheduler_pb2.SubmitBatchResponse(responses=responses)

    async def _refresh(self, model: str, caller: Principal) -> None:
        """Read side by side what Submit finds stale in its caches (the catalogue, the
        caller's limits and weight, the model's config and averages), so a Submit after a
        quiet second waits one or two round trips for them, not six in a row."""
        reads = self.store.stale_reads(model, caller.organization, caller.user)
        if self.quotas.stale(caller.organization, caller.user):
            reads.append(self.quotas.limits_for(caller.organization, caller.user))
        if reads:
            await asyncio.gather(*reads)

    async def _refund(self, admitted: list[NewRequest], tenant_limits: Limits) -> None:
        for new in admitted:
            await self.quotas.release(
                new.tenant, new.id, None if tenant_limits.unlimited else self._cost(new)
            )

    def _enqueue_span(self, new: NewRequest) -> Any:
        return tracing.tracer(__name__).start_as_current_span(
            "usher.enqueue",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "redis",
                "usher.model": new.model,
                "usher.request_id": new.id,
            },
        )

    async def _queue_full(self, model: str, length: int) -> ResourceExhausted:
        averages, parallel = await self.store.model_averages(model)
        return ResourceExhausted(
            f"the queue for model {model!r} is full ({length} waiting); retry later",
            retry_after_seconds=max(1.0, averages.service_seconds / max(parallel, 1)),
        )

    async def _new_request(
        self,
        request: scheduler_pb2.SubmitRequest,
        caller: Principal,
        tenant_limits: Limits,
        now: float,
    ) -> NewRequest:
        share = self.settings.dedup == "always" or (
            self.settings.dedup == "deterministic" and admission.is_deterministic(request.options)
        )
        return NewRequest(
            id=new_request_id(model=request.model),
            model=request.model,
            kind=admission.request_kind(request),
            user=caller.user,
            organization=caller.organization,
            priority=tenant_limits.capped(fairness.priority_class(request.priority)),
            fallback=request.fallback_policy
            or tenant_limits.fallback_policy
            or await self._model_fallback(request.model)
            or self.settings.default_fallback,
            payload=request.SerializeToString(),
            prompt_tokens=fairness.estimate_tokens(admission.prompt_characters(request)),
            num_predict=request.options.num_predict
            if request.options.HasField("num_predict")
            else None,
            created_ms=int(now * 1000),
            deadline_ms=request.deadline.ToMilliseconds() if request.HasField("deadline") else 0,
            queue_timeout_ms=(
                request.queue_timeout.ToMilliseconds()
                if request.HasField("queue_timeout")
                else None
            ),
            idempotency_key=request.idempotency_key,
            fingerprint=admission.fingerprint(request, caller.organization) if share else "",
            result_only=request.result_only,
            traceparent=request.traceparent,
            labels=dict(request.labels),
        )

    async def _noted(
        self,
        request: scheduler_pb2.SubmitRequest,
        new: NewRequest,
        outcome: SubmitOutcome,
        caller: Principal,
        tenant_limits: Limits,
        told: bool = False,
    ) -> None:
        """Count and audit one submitted request (RESOURCE_EXHAUSTED when full); ``told``:
        the dispatcher knows of it already (``expect``)."""
        metrics.SUBMITTED.labels(request.model, _SUBMIT_RESULTS[outcome.status]).inc()
        if outcome.status == "queued" and self.on_queued is not None and not told:
            flow = fairness.flow_key(new.tenant, fairness.priority_class(new.priority))
            self.on_queued(request.model, flow, outcome.request_id)
        self.audit.record(
            caller.tenant,
            "submit",
            outcome.request_id or request.model,
            "ok" if outcome.status != "full" else "queue_full",
            outcome.status,
        )
        if outcome.status != "queued":
            # Nothing new was queued for this caller: give back what admission charged.
            await self._refund([new], tenant_limits)
        if outcome.status == "dedup":
            metrics.DEDUP_HITS.labels(request.model).inc()
        if outcome.status == "full":
            metrics.REJECTED.labels(request.model, "queue_full").inc()
            raise await self._queue_full(request.model, outcome.queue_length)

    async def _answer(
        self, request: scheduler_pb2.SubmitRequest, outcome: SubmitOutcome
    ) -> scheduler_pb2.SubmitResponse:
        """The answer to one submitted request (``_noted`` first): it as queued, started,
        shared or replayed, with its place and estimate."""
        stored = outcome.request or await self.store.inspect(request.model, outcome.request_id)
        if outcome.started is not None:
            stored = outcome.started.request  # it runs already
        if stored is None:  # finished and expired between the two calls
            raise NotFound(f"request {outcome.request_id} is gone")
        if outcome.averages is not None:  # the ETA from what the enqueue saw
            view = records.to_proto(stored, *outcome.averages)
        else:
            view = await self.view(stored)
        promised = (view.eta.min.ToMilliseconds() + view.eta.max.ToMilliseconds()) // 2
        if outcome.status == "queued" and stored.state == records.QUEUED and promised:
            # Remember the wait promised now, to measure the estimate's error at dispatch (in
            # the background; one promised no wait goes unmeasured: 0 reads as no promise).
            self.store.remember_promised_wait(stored.model, stored.id, promised)
        return scheduler_pb2.SubmitResponse(
            request=view,
            deduplicated=outcome.status == "dedup",
            replayed=outcome.status == "replayed",
        )

    async def _served_name(self, model: str) -> str:
        """The fleet's name for ``model`` (``x`` is ``x:latest``, as in Ollama), or
        NOT_FOUND before anything is stored. A name missing from the cached catalogue is
        looked up once more (a model pulled a moment ago is found); with no catalogue yet
        (no Pool has reported) any name is queued as given."""
        known = await self.store.served_models()
        if not known:
            return model
        found = admission.fleet_name(model, known)
        if found is None:
            known = await self.store.served_models(fresh=True)
            found = admission.fleet_name(model, known) if known else model
        if found is None:
            raise NotFound(admission.unknown_model_message(model, known))
        return found

    def _cost(self, new: NewRequest) -> float:
        averages = self.store.cached_averages(new.model)
        return fairness.estimate_cost(new.prompt_tokens, averages.output_tokens, new.num_predict)

    async def _admit(self, new: NewRequest, limits: Limits) -> None:
        """Check and charge ``new`` against its tenant's limits and storage bound before
        it is queued; RESOURCE_EXHAUSTED when refused."""
        checked = await self._admission(new, limits)
        if checked is not None:
            self._check_admitted(new, limits, await self.quotas.check(checked))

    async def _admission(self, new: NewRequest, limits: Limits) -> ScriptCall | None:
        """The admission script call for ``new`` (``Quotas.admission``), None when there
        is nothing to check."""
        if limits.unlimited and self.settings.tenant_max_stored_bytes <= 0:
            return None
        await self.store.submit_averages(new.model)  # warms the cache _cost reads
        timeout = new.queue_timeout_ms or self.store.defaults.queue_timeout_ms
        live_until = new.created_ms + timeout
        storage = StorageCharge(
            bytes=len(new.payload)
            + sum(len(k) + len(v) for k, v in new.labels.items())
            + ADMISSION_OVERHEAD_BYTES,
            max_bytes=self.settings.tenant_max_stored_bytes,
            lapses_ms=live_until + LIVE_GRACE_MS + self.settings.result_ttl_seconds * 1000,
        )
        return self.quotas.admission(
            new.tenant, new.id, self._cost(new), limits, live_until, storage
        )

    def _check_admitted(self, new: NewRequest, limits: Limits, verdict: Admission) -> None:
        """RESOURCE_EXHAUSTED (counted and audited) when the admission refused ``new``."""
        if verdict.admitted:
            return
        metrics.REJECTED.labels(new.model, verdict.reason).inc()
        self.audit.record(new.tenant, "submit", new.model, "rate_limited", verdict.reason)
        what = {
            "concurrency": f"{limits.max_concurrent} requests at once",
            "requests_per_minute": f"{limits.requests_per_minute} requests per minute",
            "tokens_per_minute": f"{limits.tokens_per_minute} tokens per minute",
            "stored_bytes": f"{self.settings.tenant_max_stored_bytes} bytes of queued "
            "requests and kept results",
        }[verdict.reason]
        raise ResourceExhausted(
            f"rate limit: at most {what} for {new.tenant}; retry later",
            retry_after_seconds=verdict.retry_after_seconds,
        )

    async def Get(
        self, request: scheduler_pb2.GetRequest, context: Context
    ) -> scheduler_pb2.GetResponse:
        stored = await self.owned(request.id, self.caller(context))
        return scheduler_pb2.GetResponse(request=await self.view(stored))

    async def List(
        self, request: scheduler_pb2.ListRequest, context: Context
    ) -> scheduler_pb2.ListResponse:
        caller = self.caller(context)
        if not 0 <= request.page_size <= _MAX_PAGE:
            raise InvalidArgument([FieldViolation("page_size", f"must be 0-{_MAX_PAGE}")])
        offset = _page_offset(request.page_token)
        for state in request.states:
            if state not in request_pb2.RequestState.values():
                raise InvalidArgument([FieldViolation("states", f"{state} is not a request state")])
        page_size = request.page_size or 50
        found, more = await self.store.list_for(caller.tenant, offset, page_size)
        wanted_states = set(request.states)
        views = [
            await self.view(stored)
            for stored in found
            if (not wanted_states or stored.state in wanted_states)
            and (not request.model or stored.model == request.model)
        ]
        token = base64.urlsafe_b64encode(str(offset + page_size).encode()).decode() if more else ""
        return scheduler_pb2.ListResponse(requests=views, next_page_token=token)

    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: Context
    ) -> scheduler_pb2.CancelResponse:
        caller = self.caller(context)
        stored = await self.owned(request.id, caller)
        reason = request.reason or f"cancelled by {caller.user}"
        outcome = await self.store.cancel(
            stored.model, stored.id, caller.tenant, caller.is_admin, reason
        )
        if outcome == "notfound":
            raise NotFound(f"request {request.id} not found")
        if outcome == "denied":
            raise PermissionDenied(f"request {request.id} belongs to another caller")
        if outcome == "finished":
            raise AlreadyFinished(
                f"request {request.id} already finished ({_STATE_NAMES[stored.state]})"
            )
        if outcome == "detached":
            # Others share this request: it goes on for them, and ends here for this caller.
            self.audit.record(caller.tenant, "cancel", stored.id, "detached")
            return scheduler_pb2.CancelResponse(
                request=await self.view(stored, request_pb2.REQUEST_STATE_CANCELLED)
            )
        self.audit.record(caller.tenant, "cancel", stored.id, outcome)
        if outcome == "cancelled":
            metrics.REQUESTS.labels(stored.model, "cancelled").inc()
            footprint = await self.store.footprint(stored.model, stored.id)
            await self.quotas.settle(stored.tenant, stored.id, footprint)
        elif outcome == "cancel_requested":
            await self.store.redis.publish(keys.CANCELS, stored.id)
        after = await self.store.inspect(stored.model, stored.id)
        return scheduler_pb2.CancelResponse(request=await self.view(after or stored))

    async def SwitchProvider(
        self, request: scheduler_pb2.SwitchProviderRequest, context: Context
    ) -> scheduler_pb2.SwitchProviderResponse:
        caller = self.caller(context)
        stored = await self.owned(request.id, caller)
        outcome = await self.store.switch_to_external(
            stored.model, stored.id, caller.tenant, caller.is_admin
        )
        self.audit.record(caller.tenant, "switch_provider", stored.id, outcome)
        if outcome == "notfound":
            raise NotFound(f"request {request.id} not found")
        if outcome == "denied":
            raise PermissionDenied(f"request {request.id} belongs to another caller")
        if outcome == "local_only":
            raise FailedPrecondition(
                f"request {request.id} is local-only: it never leaves the local fleet"
            )
        if outcome == "not_queued":
            raise FailedPrecondition(
                f"request {request.id} is {_STATE_NAMES[stored.state]}, not waiting in the queue"
            )
        after = await self.store.inspect(stored.model, stored.id)
        return scheduler_pb2.SwitchProviderResponse(request=await self.view(after or stored))


class SchedulerAdminServicer(scheduler_pb2_grpc.SchedulerAdminServiceServicer, _Handlers):
    def admin(self, context: Context) -> Principal:
        # Every admin call is audited by usher.audit.AuditInterceptor, outcome included.
        caller = self.caller(context)
        caller.require_admin()
        return caller

    async def _config_proto(self, model: str) -> scheduler_pb2.QueueConfig:
        config = await self.store.config(model)
        message = scheduler_pb2.QueueConfig(
            model=model,
            max_queue_size=config.max_queue_size,
            max_attempts=config.max_attempts,
            parallel=config.parallel,
        )
        message.queue_timeout.FromMilliseconds(config.queue_timeout_ms)
        message.lease_duration.FromMilliseconds(config.lease_ms)
        message.paused = config.paused
        message.fallback_policy = config.fallback  # type: ignore[assignment]
        return message

    async def UpdateQueueConfig(
        self, request: scheduler_pb2.UpdateQueueConfigRequest, context: Context
    ) -> scheduler_pb2.UpdateQueueConfigResponse:
        self.admin(context)
        problems: list[FieldViolation] = []
        if not admission.MODEL_NAME.fullmatch(request.model):
            problems.append(FieldViolation("model", "is not a model name"))
        changes: dict[str, int] = {}
        for name in ("max_queue_size", "max_attempts", "parallel"):
            if request.HasField(name):
                value = getattr(request, name)
                if value < 1:
                    problems.append(FieldViolation(name, "must be at least 1"))
                changes[name] = value
        for name, key in (("queue_timeout", "queue_timeout_ms"), ("lease_duration", "lease_ms")):
            if request.HasField(name):  # type: ignore[arg-type]
                ms = getattr(request, name).ToMilliseconds()
                if ms <= 0:
                    problems.append(FieldViolation(name, "must be positive"))
                changes[key] = ms
        if request.fallback_policy:
            if request.fallback_policy not in request_pb2.FallbackPolicy.values():
                problems.append(FieldViolation("fallback_policy", "is not a fallback policy"))
            changes["fallback"] = request.fallback_policy
        if problems:
            raise InvalidArgument(problems)
        await self.store.update_config(request.model, changes)
        return scheduler_pb2.UpdateQueueConfigResponse(
            config=await self._config_proto(request.model)
        )

    async def GetQueueStats(
        self, request: scheduler_pb2.GetQueueStatsRequest, context: Context
    ) -> scheduler_pb2.GetQueueStatsResponse:
        self.admin(context)
        models = list(request.models) or await self.store.models()
        out = []
        for model in models:
            counters = await self.store.counters(model)
            stats = scheduler_pb2.QueueStats(
                config=await self._config_proto(model),
                queued=await self.store.queue_length(model),
                running=await self.store.running_count(model),
                avg_tokens_per_second=counters.get("tokens_per_s", 0.0),
                dead_letters=await self.store.dead_letter_count(model),
            )
            for name in ("completed", "failed", "cancelled", "expired", "rejected", "deduplicated"):
                setattr(stats, name, int(counters.get(name, 0)))
            stats.avg_service_time.FromMilliseconds(int(counters.get("service_ms", 0)))
            stats.avg_queue_wait.FromMilliseconds(int(counters.get("wait_ms", 0)))
            out.append(stats)
        return scheduler_pb2.GetQueueStatsResponse(stats=out)

    async def SetTenantWeight(
        self, request: scheduler_pb2.SetTenantWeightRequest, context: Context
    ) -> scheduler_pb2.SetTenantWeightResponse:
        self.admin(context)
        problems = []
        if not request.tenant.organization:
            problems.append(FieldViolation("tenant.organization", "is required"))
        if not request.weight > 0:
            problems.append(FieldViolation("weight", "must be positive"))
        if problems:
            raise InvalidArgument(problems)
        await self.store.set_tenant_weight(
            request.tenant.organization, request.tenant.user, request.weight
        )
        return scheduler_pb2.SetTenantWeightResponse(tenant=request.tenant, weight=request.weight)

    async def ListDeadLetters(
        self, request: scheduler_pb2.ListDeadLettersRequest, context: Context
    ) -> scheduler_pb2.ListDeadLettersResponse:
        self.admin(context)
        if not admission.MODEL_NAME.fullmatch(request.model):
            raise InvalidArgument([FieldViolation("model", "is not a model name")])
        found = await self.store.dead_letters(request.model, request.page_size or 50)
        return scheduler_pb2.ListDeadLettersResponse(requests=[await self.view(s) for s in found])

    async def RetryDeadLetter(
        self, request: scheduler_pb2.RetryDeadLetterRequest, context: Context
    ) -> scheduler_pb2.RetryDeadLetterResponse:
        self.admin(context)
        _check_id(request.id)
        model = await self.store.model_of(request.id)
        outcome = (
            "notfound" if model is None else await self.store.retry_dead_letter(model, request.id)
        )
        if model is None or outcome == "notfound":
            raise NotFound(f"request {request.id} not found")
        if outcome == "not_dead":
            raise FailedPrecondition(f"request {request.id} is not in the dead-letter list")
        stored = await self.store.inspect(model, request.id)
        if stored is None:
            raise NotFound(f"request {request.id} not found")
        return scheduler_pb2.RetryDeadLetterResponse(request=await self.view(stored))

    async def SetTenantLimits(
        self, request: scheduler_pb2.SetTenantLimitsRequest, context: Context
    ) -> scheduler_pb2.SetTenantLimitsResponse:
        self.admin(context)
        given = request.limits
        problems = []
        if not request.tenant.organization:
            problems.append(FieldViolation("tenant.organization", "is required"))
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent"):
            if getattr(given, name) < 0:
                problems.append(FieldViolation(f"limits.{name}", "must not be negative"))
        if given.priority_cap not in request_pb2.Priority.values():
            problems.append(FieldViolation("limits.priority_cap", "is not a priority class (0-5)"))
        if given.fallback_policy not in request_pb2.FallbackPolicy.values():
            problems.append(FieldViolation("limits.fallback_policy", "is not a fallback policy"))
        if problems:
            raise InvalidArgument(problems)
        limits = Limits(
            given.requests_per_minute,
            given.tokens_per_minute,
            given.max_concurrent,
            given.priority_cap,
            given.fallback_policy,
        )
        await self.quotas.set_limits(request.tenant.organization, request.tenant.user, limits)
        return scheduler_pb2.SetTenantLimitsResponse(tenant=request.tenant, limits=given)

    async def PauseQueue(
        self, request: scheduler_pb2.PauseQueueRequest, context: Context
    ) -> scheduler_pb2.PauseQueueResponse:
        self.admin(context)
        if not admission.MODEL_NAME.fullmatch(request.model):
            raise InvalidArgument([FieldViolation("model", "is not a model name")])
        await self.store.set_paused(request.model, request.paused)
        return scheduler_pb2.PauseQueueResponse(config=await self._config_proto(request.model))

    async def DrainQueue(
        self, request: scheduler_pb2.DrainQueueRequest, context: Context
    ) -> scheduler_pb2.DrainQueueResponse:
        self.admin(context)
        if not admission.MODEL_NAME.fullmatch(request.model):
            raise InvalidArgument([FieldViolation("model", "is not a model name")])
        reason = request.reason or "the queue was emptied for maintenance"
        drained = await self.store.drain(request.model, f"emergency drain: {reason}")
        metrics.REQUESTS.labels(request.model, "cancelled").inc(len(drained))
        await settle_ended(self.store, self.quotas, drained)
        return scheduler_pb2.DrainQueueResponse(drained=len(drained))

    async def ResetQueueStats(
        self, request: scheduler_pb2.ResetQueueStatsRequest, context: Context
    ) -> scheduler_pb2.ResetQueueStatsResponse:
        self.admin(context)
        bad = [m for m in request.models if not admission.MODEL_NAME.match(m)]
        if bad:
            raise InvalidArgument([FieldViolation("models", f"{bad[0][:60]!r} is not a model")])
        models = list(request.models) or await self.store.models()
        for model in models:
            await self.store.reset_counters(model)
        return scheduler_pb2.ResetQueueStatsResponse(models=models)

    async def ListAuditEvents(
        self, request: scheduler_pb2.ListAuditEventsRequest, context: Context
    ) -> scheduler_pb2.ListAuditEventsResponse:
        self.admin(context)
        if not 0 <= request.page_size <= _MAX_PAGE:
            raise InvalidArgument([FieldViolation("page_size", f"must be 0-{_MAX_PAGE}")])
        if request.before_id and not re.fullmatch(r"\d{1,15}-\d{1,15}", request.before_id):
            raise InvalidArgument([FieldViolation("before_id", "is not an audit event id")])
        await self.audit.flush(force=True)  # refused calls counted so far show up too
        entries = await self.audit.recent(request.page_size or 100, request.before_id)
        events = []
        for entry in entries:
            event = scheduler_pb2.AuditEvent(
                id=entry.id,
                actor=entry.actor,
                action=entry.action,
                target=entry.target,
                outcome=entry.outcome,
                detail=entry.detail,
            )
            event.at.FromMilliseconds(entry.at_ms)
            events.append(event)
        return scheduler_pb2.ListAuditEventsResponse(events=events)
