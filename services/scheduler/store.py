"""The Redis adapter of the scheduler: one method per Lua script, typed records in and out.

Every change is one atomic script (services/scheduler/lua/, one file each, loaded once and
called by SHA); the reads the Notifier shares, and the records, are in usher/queue/.
Cross-model index keys (id → model, the caller's listing, the model set) are pipelined
*before* the script in the same round trip, so Redis applies them first and a crash in
between cannot leave a queued request that Get or List cannot find.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, WatchError
from redis.typing import EncodableT, FieldT

from services.scheduler.quotas import Footprint
from usher import keys
from usher.batching import Coalescer
from usher.connections import is_cluster
from usher.crypto import NullSealer
from usher.errors import Unavailable
from usher.keys import ModelKeys
from usher.logs import get_logger
from usher.queue import eta, fairness
from usher.queue.eta import SERVICE_ALPHA, ModelAverages
from usher.queue.reads import QueueReader, now_ms
from usher.queue.records import (
    COMPLETION_AVERAGES,
    COMPLETION_COUNTERS,
    QUEUED,
    ModelConfig,
    QueueDefaults,
    StoredRequest,
    WrittenEvents,
    decode,
    model_figures,
    pairs,
)
from usher.scripts import ScriptCall
from usher.smoothing import EWMA_ALPHA
from usher.v1 import request_pb2

__all__ = [
    "REQUEST_INDEX_BYTES",
    "TENANT_LISTING_MAX",
    "Ended",
    "FinishedWork",
    "Lease",
    "NewRequest",
    "ProgressEvent",
    "QueueStore",
    "ReapCounts",
    "SubmitOutcome",
]

#: A caller's listing keeps its newest entries only.
TENANT_LISTING_MAX = 10_000
#: What a request stores outside its own keys (listing entry, idempotency key, model
#: stream events), charged to its tenant on top of what its keys hold.
REQUEST_INDEX_BYTES = 512
#: What a completed request's keys hold besides its result, usage, labels and streamed
#: output: its metadata hash (~2.5 KB) and its event stream's first node (~4.7 KB, which
#: holds a few KB of events), as MEMORY USAGE measures them on Redis 7 (2026-12-06).
COMPLETED_RECORD_BYTES = 7_200
#: An owners set (a deduplicated request shared by several callers).
OWNERS_SET_BYTES = 256
#: What Submit reads that rarely changes (tenant weights, a model's config, and its moving
#: averages and active flows for the cost and ETA) is reused this long by the process that
#: read it; a change made through this process's admin calls applies at once.
CACHE_SECONDS = 1.0
#: The fleet's catalogue of models is reused this long (a miss is read again at once).
CATALOGUE_CACHE_SECONDS = 2.0
#: A submit adds its model to the model set unless this process did so this recently (a
#: model that was retired meanwhile is added back by the revival its enqueue reports).
MODEL_SET_SECONDS = 10.0
#: A caller's listing is trimmed to TENANT_LISTING_MAX on about one submit in this many
#: (it may run over by a few entries between trims).
LISTING_TRIM_EVERY = 16
#: Promised waits written in one pipeline at most.
PROMISE_BATCH = 256

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class NewRequest:
    id: str
    model: str
    kind: int
    user: str
    organization: str
    priority: int
    fallback: int
    payload: bytes
    prompt_tokens: int
    num_predict: int | None = None
    created_ms: int = 0
    deadline_ms: int = 0
    queue_timeout_ms: int | None = None
    idempotency_key: str = ""
    fingerprint: str = ""
    traceparent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    #: The caller reads the result alone: no output is written as it comes.
    result_only: bool = False

    @property
    def tenant(self) -> str:
        return keys.tenant_id(self.organization, self.user)


#: How often a batch is tried again when its queue changed while it was being admitted.
BATCH_ATTEMPTS = 20


#: enqueue.lua's claim arguments when no claim rides it.
_NO_CLAIM = ("", "", "")


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A request ready to enqueue: the script's arguments and what its outcome needs."""

    request: NewRequest
    klass: int
    cost: float
    created: int
    listing: str
    #: enqueue.lua's arguments before the riding claim's, and the request hash's pairs after.
    head: list[Any]
    record: list[Any]

    def args(self, claim: Sequence[Any] = _NO_CLAIM) -> list[Any]:
        """enqueue.lua's arguments; ``claim``: a claim riding it (lease ms, owner, token)."""
        return [*self.head, *claim, *self.record]


@dataclass(frozen=True, slots=True)
class SubmitOutcome:
    """queued | exists | replayed | dedup | full | refused (its admission said no: see
    ``submit``), with the request's place in its queue."""

    status: str
    request_id: str
    position: int
    queue_length: int
    #: The request as stored, when it was queued just now (no need to read it back).
    request: StoredRequest | None = None
    #: With ``request``: the model's averages and slots for its ETA, with the fair clock and
    #: running count as the enqueue saw them (no read of its own).
    averages: tuple[ModelAverages, int] | None = None
    #: A claim rode the enqueue's round trip (``submit``'s ``claim_for``) and ran: its lease,
    #: None when the queue had nothing to claim. False: no claim ran (none asked, or it
    #: failed; nothing was claimed then).
    claimed: Lease | bool | None = False
    #: The admission script's reply, when the admission rode the enqueue (``submit``).
    admission: Any = None

    @property
    def started(self) -> Lease | None:
        """The lease of the submitted request itself, when the claim beside its enqueue
        took it: it runs already."""
        claimed = self.claimed
        if isinstance(claimed, Lease) and claimed.request.id == self.request_id:
            return claimed
        return None


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to run one request until ``expires_ms``, fenced by ``token``."""

    request: StoredRequest
    token: str
    owner: str
    #: The id of the event the claim wrote ("running").
    event_id: str = ""
    #: How long the lease lasts unrenewed: the model's (UpdateQueueConfig) or the default.
    lease_ms: int = 30_000


#: One event for a running request's stream: its type ("started", "tokens") and fields.
ProgressEvent = tuple[str, dict[str, str | int | float]]


@dataclass(frozen=True, slots=True)
class FinishedWork:
    """What a dispatcher reports when it finishes a leased request."""

    state: int
    error: str = ""
    result: bytes = b""
    usage: bytes = b""
    #: Actual prompt + output tokens, to settle the fairness estimate; None when unknown.
    actual_tokens: int | None = None
    service_ms: float = 0.0
    tokens_per_second: float = 0.0
    output_tokens: int = 0


def _unwritten(written: asyncio.Future[None]) -> None:
    """A promised wait that could not be written goes unmeasured: noted, not raised."""
    if not written.cancelled() and (error := written.exception()) is not None:
        log.warning("promised wait not written", error=str(error))


_ENDED_TYPES: dict[int, str] = {
    request_pb2.REQUEST_STATE_COMPLETED: "completed",
    request_pb2.REQUEST_STATE_FAILED: "failed",
    request_pb2.REQUEST_STATE_CANCELLED: "cancelled",
}


def _as_text(value: str | int | float) -> str:
    """A script argument as Redis keeps it (redis-py writes floats with repr)."""
    return repr(value) if isinstance(value, float) else str(value)


def _finish_written(
    lease: Lease,
    work: FinishedWork,
    packed: Sequence[str | int | float],
    now: int,
    reply: Sequence[Any],
) -> WrittenEvents | None:
    """The events complete.lua just wrote, as its reply names them (None when it cannot
    say them all: a cancel without a reason takes the one the script finds)."""
    kind = _ENDED_TYPES.get(work.state)
    if kind is None or len(reply) < 4 or (not work.error and kind == "cancelled"):
        return None
    request_id = lease.request.id
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in reply[3]]
    base = {"id": request_id, "ts": str(now)}
    written: list[dict[str, str]] = []
    at = 0
    while at < len(packed):
        count = int(packed[at + 1])
        fields = {"type": str(packed[at]), **base, "state": str(request_pb2.REQUEST_STATE_RUNNING)}
        items = packed[at + 2 : at + 2 + count]
        fields.update((str(n), _as_text(v)) for n, v in zip(items[::2], items[1::2], strict=True))
        written.append(fields)
        at += 2 + count
    written.append({"type": kind, **base, "state": str(work.state), "error": work.error})
    if len(written) != len(ids):
        return None
    after = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
    events = tuple(
        (event_id, {**fields, "eid": event_id})
        for event_id, fields in zip(ids, written, strict=True)
    )
    return WrittenEvents(lease.request.model, request_id, after, events, work.result, work.usage)


def completed_footprint(
    lease: Lease, state: int, extra: Sequence[str | bytes], streamed: bool, owners_set: bool
) -> int:
    """What a request holds in Redis once it ended, estimated from what was written rather
    than measured (a MEMORY USAGE per key cost three commands per request): its record's
    metadata and event stream (COMPLETED_RECORD_BYTES), its labels, the result and usage
    written now, the output its events hold when it streamed (the text the result holds),
    its owners set, its prompt when it failed (a dead letter keeps it), and what lies
    outside its keys (REQUEST_INDEX_BYTES). For ordinary requests it errs by some hundreds
    of bytes either way; the quota still bounds what a tenant keeps, in bytes."""
    stored = lease.request
    written = sum(len(item) for item in extra)
    labels = sum(len(k) + len(v) for k, v in stored.labels.items())
    size = COMPLETED_RECORD_BYTES + REQUEST_INDEX_BYTES + labels + written
    if streamed and len(extra) >= 2 and extra[0] == "result":
        size += len(extra[1])
    if owners_set:
        size += OWNERS_SET_BYTES
    if state == request_pb2.REQUEST_STATE_FAILED:
        size += len(stored.payload)
    return size


@dataclass(frozen=True, slots=True)
class Ended:
    """A request a script ended, with its owner, whose quotas the caller settles."""

    request_id: str
    model: str
    tenant: str


def _ended(model: str, flat: Sequence[bytes]) -> tuple[Ended, ...]:
    """{id, org, user, ...} from a script → Ended records."""
    return tuple(
        Ended(decode(flat[i]), model, keys.tenant_id(decode(flat[i + 1]), decode(flat[i + 2])))
        for i in range(0, len(flat), 3)
    )


@dataclass(frozen=True, slots=True)
class ReapCounts:
    requeued: int = 0
    dead_lettered: int = 0
    expired: int = 0
    to_external: int = 0
    #: The requests that ended in this pass (expired, dead-lettered, cancelled).
    ended: tuple[Ended, ...] = ()
    #: Dead letters deleted: older than the retention (QueueDefaults).
    dead_letters_deleted: int = 0
    #: Requests back in line after their retry backoff.
    back_in_line: int = 0


#: Config fields the scripts read from their copies in the fairness hash ("paused" as
#: itself, the others as "config:<name>").
COPIED_CONFIG = frozenset(
    {"paused", "max_queue_size", "max_attempts", "queue_timeout_ms", "lease_ms"}
)

#: The counters ResetQueueStats zeroes (every other field of a model's stats is an average).
RESETTABLE_COUNTERS = (
    "completed",
    "failed",
    "cancelled",
    "expired",
    "rejected",
    "deduplicated",
)


def _beside(prepared: Sequence[_Prepared], model_set: bool) -> list[str]:
    """The keys a Submit writes outside its model's slot that a failover there could cost
    an accepted request: the caller's listing (List), and with ``model_set`` the model set
    (without its entry no loop walks the model's queue until the model's next Submit) and
    the model names (Get, Watch and Cancel by id alone ask the models its id's tag names)."""
    written = list({entry.listing for entry in prepared})
    if model_set:
        written += [keys.MODELS, keys.MODEL_NAMES]
    return written


class QueueStore(QueueReader):
    """Per-model fair queues, leases and the request records, on one Redis: the shared
    reads (usher/queue/reads.py) and every change, one Lua script each."""

    SCRIPTS: ClassVar[Mapping[str, Sequence[str]]] = {
        **QueueReader.SCRIPTS,
        "services.scheduler": (
            "enqueue",
            "claim",
            "heartbeat",
            "complete",
            "cancel",
            "reap",
            "requeue",
            "progress",
            "switch",
            "drain",
            "retry",
            "retire",
            "unavailable",
        ),
    }

    def __init__(
        self,
        client: aioredis.Redis,
        defaults: QueueDefaults | None = None,
        sealer: NullSealer | None = None,
    ) -> None:
        super().__init__(client, defaults, sealer)
        #: Told of the events a completion wrote as soon as its script returns (``usher
        #: serve`` hands them to its Notifier's fan-out); None: nobody in this process is.
        self.on_written: Callable[[WrittenEvents], None] | None = None
        self._weights: dict[str, tuple[float, float]] = {}
        self._catalogue: tuple[float, frozenset[str]] = (-1e9, frozenset())
        #: model → when this process last added it to the model set.
        self._model_set_at: dict[str, float] = {}
        #: model → (read until, config) and (read until, averages, slots): CACHE_SECONDS.
        self._configs: dict[str, tuple[float, ModelConfig]] = {}
        self._slow_averages: dict[str, tuple[float, ModelAverages, int]] = {}
        #: Promised waits on their way to Redis (remember_promised_wait).
        self._promises: Coalescer[tuple[str, str, int], None] = Coalescer(
            self._write_promises, PROMISE_BATCH
        )

    def _queue_wait(self, pipe: Pipeline, model: str, beside: Iterable[str] = ()) -> int:
        """WAIT on the connection that carried the model's script (WAIT counts replicas
        that have this connection's writes): on a Cluster, the node serving the model, and
        those holding the keys written ``beside`` it where they are others (``_beside``).
        How many WAITs were queued (their replies come last)."""
        args = ("WAIT", self.defaults.wait_replicas, self.defaults.wait_timeout_ms)
        if not is_cluster(self.redis):
            pipe.execute_command(*args)
            return 1
        cluster = cast(Any, self.redis)
        nodes: dict[str, Any] = {}
        for key in (ModelKeys(model).queue, *beside):
            node = cluster.get_node_from_key(key)
            nodes.setdefault(node.name, node)
        for node in nodes.values():
            pipe.execute_command(*args, target_nodes=node)
        return len(nodes)

    async def _replicated(self, model: str) -> None:
        """WAIT for what was written to the model's keys on other connections: a barrier
        write on this one comes after them in the replication stream, so replicas holding
        it hold them too."""
        if not self.defaults.wait_replicas:
            return

        def build(pipe: Pipeline) -> None:
            pipe.set(ModelKeys(model).wait_barrier, 1, px=self.defaults.wait_timeout_ms + 1000)
            self._queue_wait(pipe, model)

        self._check_replicated(int((await self._execute(build))[-1]))

    def _check_replicated(self, acknowledged: int) -> None:
        if acknowledged < self.defaults.wait_replicas:
            # Stored on the primary but not yet on enough replicas: a failover now could
            # lose it, so it is not promised. A retry with the same idempotency key finds it.
            raise Unavailable(
                f"the request was not yet replicated to {self.defaults.wait_replicas} Redis "
                "replicas; retry with the same idempotency key"
            )

    async def _zrevrange(self, key: str, start: int, end: int) -> list[bytes]:
        return cast("list[bytes]", await self.redis.zrevrange(key, start, end))

    # ---- submit ---------------------------------------------------------------------------

    async def tenant_weight(self, organization: str, user: str) -> float:
        tenant = keys.tenant_id(organization, user)
        cached = self._weights.get(tenant)
        now = time.monotonic()
        if cached and cached[0] > now:
            return cached[1]
        user_weight, org_weight = await self.redis.hmget(
            keys.TENANT_WEIGHTS, [tenant, keys.tenant_id(organization, "")]
        )
        raw = user_weight or org_weight
        weight = float(raw) if raw else 1.0
        self._weights[tenant] = (now + CACHE_SECONDS, weight)
        return weight

    async def set_tenant_weight(self, organization: str, user: str, weight: float) -> None:
        await self.redis.hset(keys.TENANT_WEIGHTS, keys.tenant_id(organization, user), repr(weight))
        self._weights.clear()

    async def cached_config(self, model: str) -> ModelConfig:
        """The model's config as read at most CACHE_SECONDS ago (or as changed here since)."""
        cached = self._configs.get(model)
        if cached is None or cached[0] <= time.monotonic():
            config = await self.config(model)
            cached = (time.monotonic() + CACHE_SECONDS, config)
            self._configs[model] = cached
        return cached[1]

    async def submit_averages(self, model: str) -> tuple[ModelAverages, int]:
        """The model's averages and slots for a new request's cost and ETA, read at most
        CACHE_SECONDS ago (so a flow that started sending since is not yet expected to
        overtake); the fair clock and running count, which move with every claim, come
        with each enqueue's reply instead (SubmitOutcome.averages)."""
        cached = self._slow_averages.get(model)
        if cached is None or cached[0] <= time.monotonic():
            averages, slots = await self.model_averages(model)
            cached = (time.monotonic() + CACHE_SECONDS, averages, slots)
            self._slow_averages[model] = cached
        return cached[1], cached[2]

    def stale_reads(
        self, model: str, organization: str, user: str
    ) -> list[Coroutine[Any, Any, object]]:
        """The reads a Submit of ``model`` by this tenant would make now (what the caches
        above don't hold fresh), to run side by side rather than one after another; none
        while they are fresh. A model's own are left out until the catalogue names it, so
        a name nobody serves fills no cache."""
        now = time.monotonic()
        reads: list[Coroutine[Any, Any, object]] = []
        at, known = self._catalogue
        if now - at > CATALOGUE_CACHE_SECONDS:
            reads.append(self.served_models())
        weight = self._weights.get(keys.tenant_id(organization, user))
        if weight is None or weight[0] <= now:
            reads.append(self.tenant_weight(organization, user))
        if model in known:
            config = self._configs.get(model)
            if config is None or config[0] <= now:
                reads.append(self.cached_config(model))
            averages = self._slow_averages.get(model)
            if averages is None or averages[0] <= now:
                reads.append(self.submit_averages(model))
        return reads

    def _forget_model(self, model: str) -> None:
        """Its config changed here, or it left: read it afresh next time."""
        self._averages.pop(model, None)
        self._slow_averages.pop(model, None)
        self._configs.pop(model, None)

    @property
    def admission_rides(self) -> bool:
        """Whether a Submit's admission can ride its enqueue's round trip (``submit``'s
        ``admission``): on a Cluster the tenant's keys and the model's are on other nodes."""
        return not is_cluster(self.redis)

    async def submit(
        self, request: NewRequest, claim_for: str = "", admission: ScriptCall | None = None
    ) -> SubmitOutcome:
        """Queue ``request`` (or find the request it repeats or shares) in one round trip.

        ``claim_for``: a dispatcher holding a slot of the model and waiting for work. Its
        claim of the model's next request in fair order rides the enqueue's script call,
        after the enqueue: the request queued just now when the queue was empty, written
        running at once then (enqueue.lua). The lease is in the outcome's ``claimed``.

        ``admission``: the caller's admission (``Quotas.admission``; only where
        ``admission_rides``), sent first in the same round trip with the request's
        ``admission_refused`` marker as its last key. Refused, nothing is queued: the outcome
        is ``refused``, with the admission's reply in ``admission``.

        Sent again after Redis lost its scripts (some of the calls failed), a call that ran
        the first time is not repeated: the enqueue with its claim (a repeat could take a
        second request), and the admission (a request refused or charged once) are read from the
        first attempt; an admission that did not run then charges the request late, without
        its marker when the enqueue ran (the request stands)."""
        prepared = await self._prepare(request)
        token = secrets.token_hex(8) if claim_for else ""
        waits = 0
        model_set = self._model_set_due(request.model)
        marker = ModelKeys(request.model).admission_refused(request.id)
        #: Where each call's reply is in the latest attempt's replies, and the replies of a
        #: call that ran (from whichever attempt ran it).
        at: dict[str, int] = {}
        ran: dict[str, Any] = {}

        def repeated(replies: list[Any]) -> None:
            for name, place in at.items():
                if not isinstance(replies[place], NoScriptError):
                    ran[name] = replies[place]

        def build(pipe: Pipeline) -> None:
            nonlocal waits
            at.clear()
            if admission is not None and "admit" not in ran:
                at["admit"] = len(pipe)
                keys_ = [*admission.keys, *(() if "enqueue" in ran else (marker,))]
                pipe.evalsha(admission.script.sha, len(keys_), *keys_, *admission.args)
            self._index(pipe, prepared, model_set)
            if "enqueue" not in ran:  # the claim rides it: neither ran
                at["enqueue"] = len(pipe)
                claim = (self.defaults.lease_ms, claim_for, token) if claim_for else _NO_CLAIM
                self._queue_script(pipe, "enqueue", request.model, prepared.args(claim))
            if self.defaults.wait_replicas:
                waits = self._queue_wait(pipe, request.model, _beside([prepared], model_set))

        replies = await self._execute(
            build,
            raise_on_error=False,  # what ran is read from the replies, by place
            others=() if admission is None else (admission.script,),
            repeated=repeated,
        )
        for name, place in at.items():
            ran.setdefault(name, replies[place])
        claimed: Lease | bool | None = False
        if claim_for:
            claimed = self._claimed(ran["enqueue"], token, claim_for, request.model)
        acknowledged = replies[len(replies) - waits :]
        others = [r for i, r in enumerate(replies) if i not in at.values()]
        for reply in (ran.get("admit"), *others, ran["enqueue"]):
            if isinstance(reply, Exception):
                raise reply
        for count in acknowledged:
            self._check_replicated(int(count))
        if model_set:
            self._model_set_written(request.model)
        outcome = await self._outcome(prepared, ran["enqueue"])
        return replace(outcome, claimed=claimed, admission=ran.get("admit"))

    def _claimed(self, enqueued: Any, token: str, owner: str, model: str) -> Lease | bool | None:
        """What a claim riding an enqueue took (a lease, None: nothing queued), taken off the
        end of the enqueue's reply; False when the enqueue failed (the dispatcher claims on
        its own)."""
        if isinstance(enqueued, Exception):
            log.warning("claim riding an enqueue failed", model=model, error=str(enqueued))
            return False
        return self._lease(enqueued.pop(), token, owner)

    async def submit_batch(self, requests: Sequence[NewRequest]) -> list[SubmitOutcome] | int:
        """Queue every request of one model, or none: the outcomes in order, or (nothing
        queued) the queue's length when it has no room for them all.

        The queue and its limit are watched while the room is checked, and the enqueues run
        in one MULTI/EXEC, so no other submit or claim slips in between: if either key
        changed, the transaction is dropped whole and tried again."""
        prepared = [await self._prepare(r) for r in requests]
        model = requests[0].model
        mk = ModelKeys(model)

        waits = 0
        model_set = self._model_set_due(model)

        def index_all(pipe: Pipeline) -> None:
            nonlocal waits
            for n, entry in enumerate(prepared):
                self._index(pipe, entry, model_set and n == 0)
            if self.defaults.wait_replicas:
                waits = self._queue_wait(pipe, model, _beside(prepared, model_set))

        indexed = await self._execute(index_all)
        for count in indexed[len(indexed) - waits :]:
            self._check_replicated(int(count))
        if model_set:
            self._model_set_written(model)
        enqueue = self._scripts["enqueue"]
        if not (await self.redis.script_exists(enqueue.sha))[0]:
            await self.redis.script_load(enqueue.script)  # no NOSCRIPT inside the MULTI
        for _ in range(BATCH_ATTEMPTS):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(mk.queue, mk.config)
                    length = int(await pipe.zcard(mk.queue))
                    raw_limit = await pipe.hget(mk.config, "max_queue_size")
                    limit = int(raw_limit) if raw_limit else self.defaults.max_queue_size
                    if length + len(prepared) > limit:
                        await self._unindex(prepared, [None] * len(prepared))
                        return length
                    pipe.multi()  # type: ignore[no-untyped-call]
                    for entry in prepared:
                        self._queue_script(pipe, "enqueue", model, entry.args())
                    replies = await pipe.execute()
                except WatchError:
                    continue
            await self._replicated(model)
            return [
                await self._outcome(p, reply) for p, reply in zip(prepared, replies, strict=True)
            ]
        await self._unindex(prepared, [None] * len(prepared))
        raise Unavailable(f"the queue of {model} kept changing; retry the batch")

    async def _prepare(self, request: NewRequest) -> _Prepared:
        """What enqueueing ``request`` writes: the script's arguments and its cost."""
        averages, _ = await self.submit_averages(request.model)
        weight = await self.tenant_weight(request.organization, request.user)
        klass = fairness.priority_class(request.priority)
        cost = fairness.estimate_cost(
            request.prompt_tokens, averages.output_tokens, request.num_predict
        )
        created = request.created_ms or now_ms()
        fields: dict[str, str | int | bytes] = {
            "id": request.id,
            "model": request.model,
            "kind": request.kind,
            "user": request.user,
            "org": request.organization,
            "priority": klass,
            "fallback": request.fallback,
            "route": request_pb2.ROUTE_LOCAL,
            "idem": request.idempotency_key,
            "traceparent": request.traceparent,
            "labels": json.dumps(request.labels, sort_keys=True),
            "prompt_tokens": request.prompt_tokens,
            "payload": self.sealer.seal(request.payload, request.id),
        }
        if request.result_only:
            fields["result_only"] = 1
        flat: list[str | int | bytes] = []
        for name, value in fields.items():
            flat += [name, value]
        listing = keys.tenant_requests(request.tenant)

        return _Prepared(
            request=request,
            klass=klass,
            cost=cost,
            created=created,
            listing=listing,
            head=[
                request.id,
                request.tenant,
                fairness.flow_key(request.tenant, klass),
                repr(weight),
                repr(cost),
                klass,
                repr(self.defaults.priority_lead),
                self.defaults.max_queue_size,
                request.fingerprint,
                request.idempotency_key,
                self.defaults.idempotency_ttl_seconds,
                request.queue_timeout_ms or 0,
                self.defaults.max_attempts,
                self.defaults.queue_timeout_ms,
                created,
                request.deadline_ms,
                round(eta.ARRIVAL_TAU_SECONDS * 1000),
            ],
            record=flat,
        )

    def _model_set_due(self, model: str) -> bool:
        """Whether a Submit of ``model`` adds it to the model set: decided once per Submit
        (a pipeline built again after a failed attempt writes it again) and put off only
        once a write of it went through (``_model_set_written``)."""
        return time.monotonic() - self._model_set_at.get(model, -math.inf) > MODEL_SET_SECONDS

    def _model_set_written(self, model: str) -> None:
        self._model_set_at[model] = time.monotonic()

    def _index(self, pipe: Pipeline, prepared: _Prepared, model_set: bool) -> None:
        """The caller's listing and (``model_set``) the model set and names: other slots.
        The id needs no index entry: it ends with its model's tag (usher/ids.py)."""
        request = prepared.request
        pipe.zadd(prepared.listing, {request.id: prepared.created})
        if random.randrange(LISTING_TRIM_EVERY) == 0:
            pipe.zremrangebyrank(prepared.listing, 0, -TENANT_LISTING_MAX - 1)
        if model_set:
            pipe.sadd(keys.MODELS, request.model)
            pipe.sadd(keys.MODEL_NAMES, request.model)

    async def _unindex(self, prepared: Sequence[_Prepared], shared: Sequence[str | None]) -> None:
        """Nothing was stored under these ids: point each caller's listing at the request
        they share instead (if any)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry, other in zip(prepared, shared, strict=True):
                pipe.zrem(entry.listing, entry.request.id)
                if other and other != entry.request.id:
                    pipe.zadd(entry.listing, {other: entry.created})
            await pipe.execute()

    async def _outcome(self, prepared: _Prepared, reply: Any) -> SubmitOutcome:
        request, klass, cost, created = (
            prepared.request,
            prepared.klass,
            prepared.cost,
            prepared.created,
        )
        status, request_id, position, length, *queued = reply
        outcome = SubmitOutcome(status.decode(), request_id.decode(), int(position), int(length))
        if queued:
            start, max_attempts, queue_timeout_ms, revived, virtual_time, running = queued
            if int(revived):
                # Its keys were expiring after it left the fleet, and a retire pass may have
                # taken it off the model set meanwhile: every loop must walk it again.
                await self.redis.sadd(keys.MODELS, request.model)
            outcome = replace(
                outcome,
                request=StoredRequest(
                    id=request.id,
                    model=request.model,
                    kind=request.kind,
                    state=QUEUED,
                    user=request.user,
                    organization=request.organization,
                    priority=klass,
                    fallback=request.fallback,
                    route=request_pb2.ROUTE_LOCAL,
                    created_ms=created,
                    started_ms=0,
                    finished_ms=0,
                    deadline_ms=request.deadline_ms,
                    queue_timeout_ms=int(queue_timeout_ms),
                    attempts=0,
                    max_attempts=int(max_attempts),
                    error="",
                    idempotency_key=request.idempotency_key,
                    cancel_requested=False,
                    labels=dict(request.labels),
                    traceparent=request.traceparent,
                    payload=request.payload,
                    result=b"",
                    usage=b"",
                    prompt_tokens=request.prompt_tokens,
                    cost=cost,
                    lease_token="",
                    start=float(start),
                    owners=frozenset({request.tenant}),
                    position=int(position),
                    queue_length=int(length),
                ),
                averages=await self._enqueued_averages(
                    request.model, float(virtual_time), int(running)
                ),
            )
        if outcome.request_id != request.id or outcome.status in ("full", "refused"):
            await self._unindex([prepared], [outcome.request_id])
        return outcome

    async def _enqueued_averages(
        self, model: str, virtual_time: float, running: int
    ) -> tuple[ModelAverages, int]:
        averages, slots = await self.submit_averages(model)
        return replace(averages, virtual_time=virtual_time, running=running), slots

    # ---- read -----------------------------------------------------------------------------

    def remember_promised_wait(self, model: str, request_id: str, wait_ms: int) -> None:
        """Note the wait promised to a request at Submit (the dispatcher measures the
        estimate's error against it). Written in the background: the caller's answer doesn't
        wait for it, and those promised while a write is under way go together in the next
        pipeline, not a round trip each. A request claimed before its promise is written
        goes unmeasured."""
        self._promises.submit((model, request_id, wait_ms)).add_done_callback(_unwritten)

    async def _write_promises(self, batch: list[tuple[str, str, int]]) -> list[None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for model, request_id, wait_ms in batch:
                pipe.hset(ModelKeys(model).request(request_id), "promised_wait_ms", wait_ms)
            await pipe.execute()
        return [None] * len(batch)

    async def list_for(
        self, tenant: str, offset: int, limit: int
    ) -> tuple[list[StoredRequest], bool]:
        """The caller's requests, newest first; the flag says whether more follow."""
        ids = [
            raw.decode()
            for raw in await self._zrevrange(keys.tenant_requests(tenant), offset, offset + limit)
        ]
        more = len(ids) > limit
        ids = ids[:limit]
        if not ids:
            return [], False
        models = await self.models_of(ids)
        wanted = [(i, m) for i, m in zip(ids, models, strict=True) if m]

        def build(pipe: Pipeline) -> None:
            for request_id, model in wanted:
                self._queue_script(pipe, "inspect", model, [request_id])

        replies = await self._execute(build)
        found = []
        for reply in replies:
            if reply is not None:
                flat, owners, position, length = reply
                found.append(
                    self._stored(
                        pairs(flat),
                        frozenset(o.decode() for o in owners),
                        int(position),
                        int(length),
                    )
                )
        return found, more

    async def served_models(self, *, fresh: bool = False) -> frozenset[str]:
        """The models the fleet offers (the Pool's catalogue, cached briefly); empty until
        a Pool has reported."""
        at, models = self._catalogue
        if fresh or time.monotonic() - at > CATALOGUE_CACHE_SECONDS:
            raw = cast(list[bytes], await self.redis.hkeys(keys.POOL_CATALOGUE))
            models = frozenset(m.decode() for m in raw)
            self._catalogue = (time.monotonic(), models)
        return models

    async def counters(self, model: str) -> dict[str, float]:
        mk = ModelKeys(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(mk.stats)
            pipe.hmget(mk.fairness, [*COMPLETION_COUNTERS, *COMPLETION_AVERAGES])
            stats, moved = await pipe.execute()
        return model_figures(stats, moved)

    async def reset_counters(self, model: str) -> None:
        """Zero the model's outcome counters (the averages that drive ETAs stay)."""
        mk = ModelKeys(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(mk.stats, *RESETTABLE_COUNTERS)
            pipe.hdel(mk.fairness, *COMPLETION_COUNTERS)
            await pipe.execute()

    async def running_count(self, model: str) -> int:
        count: int = await self.redis.zcard(ModelKeys(model).leases)
        return count

    async def dead_letter_count(self, model: str) -> int:
        count: int = await self.redis.zcard(ModelKeys(model).dead_letters)
        return count

    async def dead_letters(self, model: str, limit: int) -> list[StoredRequest]:
        ids = await self._zrevrange(ModelKeys(model).dead_letters, 0, limit - 1)
        found = [await self.inspect(model, raw.decode()) for raw in ids]
        return [r for r in found if r is not None]

    # ---- config ---------------------------------------------------------------------------

    async def set_paused(self, model: str, paused: bool) -> ModelConfig:
        await self.update_config(model, {"paused": 1 if paused else 0})
        return await self.config(model)

    async def drain(self, model: str, reason: str) -> list[Ended]:
        """End every queued request of the model with ``reason``; the requests ended."""
        out: list[Ended] = []
        while True:
            drained, ended = await self._run(
                "drain", model, [reason, 500, self.defaults.result_ttl_seconds]
            )
            out += _ended(model, ended)
            if int(drained) == 0:
                return out

    async def retire(self, model: str, ttl_seconds: int) -> bool:
        """Take a model that left the fleet off the model set (so no loop walks it) and
        let its keys expire in ``ttl_seconds``, when nothing of it is queued, running or
        dead-lettered; False (and it stays) otherwise."""
        await self.redis.srem(keys.MODELS, model)
        self._model_set_at.pop(model, None)
        if int(await self._run("retire", model, [ttl_seconds])) == 1:
            self._forget_model(model)
            return True
        await self.redis.sadd(keys.MODELS, model)
        return False

    async def hand_out_unavailable(self, model: str, limit: int = 500) -> int:
        """No local instance serves ``model``: its queued requests that may leave the local
        fleet go to the external lane now; how many did."""
        return int(await self._run("unavailable", model, [limit]))

    async def retry_dead_letter(self, model: str, request_id: str) -> str:
        """notfound | not_dead | retried."""
        return str((await self._run("retry", model, [request_id])).decode())

    async def update_config(self, model: str, changes: dict[str, int]) -> ModelConfig:
        if changes:
            mapping: dict[FieldT, EncodableT] = dict(changes.items())
            # enqueue.lua and claim.lua read their copies in the fairness hash.
            copies: dict[FieldT, EncodableT] = {
                (name if name == "paused" else f"config:{name}"): value
                for name, value in changes.items()
                if name in COPIED_CONFIG
            }
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hset(ModelKeys(model).config, mapping=mapping)
                if copies:
                    pipe.hset(ModelKeys(model).fairness, mapping=copies)
                pipe.sadd(keys.MODELS, model)
                await pipe.execute()
        self._forget_model(model)
        return await self.config(model)

    # ---- cancel ---------------------------------------------------------------------------

    async def cancel(
        self, model: str, request_id: str, caller: str, is_admin: bool, reason: str
    ) -> str:
        """notfound | denied | finished | detached | cancelled | cancel_requested."""
        reply = await self._run(
            "cancel",
            model,
            [
                request_id,
                caller,
                "1" if is_admin else "0",
                reason,
                self.defaults.result_ttl_seconds,
            ],
        )
        return str(reply.decode())

    async def switch_to_external(
        self, model: str, request_id: str, caller: str, is_admin: bool
    ) -> str:
        """notfound | denied | local_only | not_queued | already | switched."""
        reply = await self._run(
            "switch",
            model,
            [request_id, caller, "1" if is_admin else "0", self.defaults.queue_timeout_ms],
        )
        return str(reply.decode())

    # ---- dispatch -------------------------------------------------------------------------

    async def claim(
        self,
        model: str,
        owner: str,
        lease_ms: int | None = None,
        external: bool = False,
        first: str = "",
    ) -> Lease | None:
        """Take the next request in fair order (or from the external lane) under a lease;
        the request ``first`` ahead of that order while it is queued (a slot held for its
        flow: services/scheduler/anticipation.py)."""
        mk = ModelKeys(model)
        token = secrets.token_hex(8)
        flat = await self._scripts["claim"](
            keys=[mk.external if external else mk.queue],
            args=[
                mk.base,
                now_ms(),
                lease_ms or self.defaults.lease_ms,
                owner,
                token,
                "0" if external else "1",
                first,
            ],
            client=self.redis,
        )
        return self._lease(flat, token, owner)

    def _lease(self, flat: Any, token: str, owner: str) -> Lease | None:
        """The lease a claim script's reply gives (None: nothing was claimed)."""
        if not flat:
            return None
        raw = pairs(flat)
        return Lease(
            self._stored(raw),
            token,
            owner,
            decode(raw.pop(b"claim_event_id", b"")),
            int(raw.pop(b"claim_lease_ms", self.defaults.lease_ms)),
        )

    async def heartbeat(self, lease: Lease) -> int:
        """-1: lease lost; 1: cancel requested; 0: carry on."""
        reply = await self._run(
            "heartbeat",
            lease.request.model,
            [lease.request.id, lease.token, lease.lease_ms],
        )
        return int(reply)

    async def finish(
        self,
        lease: Lease,
        work: FinishedWork,
        progress: Sequence[ProgressEvent] = (),
        *,
        streamed: bool = True,
        finished_ms: int | None = None,
    ) -> Footprint | None:
        """Record the outcome, with ``progress`` still unwritten before it, in one script
        call; what the request holds now (for its tenant's storage charge: an estimate from
        the sizes written, completed_footprint), or None when the lease was lost and
        someone else owns it now. ``streamed`` False: no progress was written since the
        claim (a caller of the result alone), so the claim's event is the last one.
        ``finished_ms``: the end's time as recorded (now when not given)."""
        extra: list[str | bytes] = []
        if work.result:
            extra += ["result", self.sealer.seal(work.result, lease.request.id)]
        if work.usage:
            extra += ["usage", work.usage]
        now = now_ms() if finished_ms is None else finished_ms
        packed = self._packed(lease, progress)
        # The event before this call's, for a reader in this process that is handed them;
        # known without a look (the claim's, nothing written since) it is passed whoever
        # reads it: a request written running at once then ends without a stream of its own
        # (complete.lua).
        if not streamed and lease.event_id:
            after = lease.event_id
        else:
            after = "-" if self.on_written is None else ""
        reply = await self._run(
            "complete",
            lease.request.model,
            [
                lease.request.id,
                lease.token,
                work.state,
                work.error,
                self.defaults.result_ttl_seconds,
                -1 if work.actual_tokens is None else work.actual_tokens,
                repr(work.service_ms),
                repr(work.tokens_per_second),
                work.output_tokens,
                repr(EWMA_ALPHA),
                repr(SERVICE_ALPHA),
                after,
                len(extra),
                *extra,
                *packed,
            ],
            now,
        )
        if not isinstance(reply, list):
            return None
        handed = False
        if self.on_written is not None:
            # The request is finished whatever a listener makes of its events.
            with contextlib.suppress(Exception):
                written = _finish_written(lease, work, packed, now, reply)
                if written is not None:
                    self.on_written(written)
                    handed = True
        if handed:
            # A watcher handed them in this process (usher serve's gateway) runs first: the
            # answer goes out before its writer's bookkeeping (metrics, quota settle).
            await asyncio.sleep(0)
        # A request that failed for good stays (a dead letter) until an operator retries it.
        kept = work.state == request_pb2.REQUEST_STATE_FAILED
        expires = 0 if kept else now_ms() + self.defaults.result_ttl_seconds * 1000
        size = completed_footprint(lease, work.state, extra, streamed, bool(int(reply[1])))
        return Footprint(size, expires)

    async def requeue(
        self, lease: Lease, reason: str, count_attempt: bool = False, backoff_ms: int = 0
    ) -> bool:
        """Give a leased request back to its original place (False when the lease was
        lost); with ``backoff_ms``, only once that has passed (the reaper puts it back),
        QUEUED meanwhile and holding nothing."""
        reply = await self._run(
            "requeue",
            lease.request.model,
            [lease.request.id, lease.token, "1" if count_attempt else "0", reason, backoff_ms],
        )
        return int(reply) == 1

    async def progress(self, lease: Lease, kind: str, fields: dict[str, str | int | float]) -> bool:
        """Append a progress/token event to the request's stream (False: lease lost)."""
        return await self.progress_events(lease, [(kind, fields)])

    async def progress_events(self, lease: Lease, events: Sequence[ProgressEvent]) -> bool:
        """Append progress/token events to the request's stream in one script call (False:
        the lease was lost)."""
        return (await self.progress_of_many([(lease, events)]))[0]

    async def progress_of_many(
        self, writes: Sequence[tuple[Lease, Sequence[ProgressEvent]]]
    ) -> list[bool]:
        """``progress_events`` for several running requests in one round trip (each False
        when its lease was lost)."""
        wanted = [(lease, events) for lease, events in writes if events]

        def build(pipe: Pipeline) -> None:
            for lease, events in wanted:
                self._queue_script(
                    pipe,
                    "progress",
                    lease.request.model,
                    [lease.request.id, lease.token, *self._packed(lease, events)],
                )

        replies = iter(await self._execute(build) if wanted else [])
        return [next(replies) != -1 if events else True for _, events in writes]

    def _packed(self, lease: Lease, events: Sequence[ProgressEvent]) -> list[str | int | float]:
        """Events as the scripts read them (emit_packed): type, item count, items."""
        packed: list[str | int | float] = []
        for kind, fields in events:
            packed += [kind, 2 * len(fields)]
            for name, value in fields.items():
                if name == "text":  # generated output is a result: sealed like one
                    value = self.sealer.seal_text(str(value), lease.request.id)
                packed += [name, value]
        return packed

    async def reap(self, model: str, limit: int = 500) -> ReapCounts:
        requeued, dead, expired, external, ended, deleted, back = await self._run(
            "reap",
            model,
            [
                limit,
                self.defaults.result_ttl_seconds,
                self.defaults.dead_letter_retention_seconds * 1000,
            ],
        )
        return ReapCounts(
            int(requeued),
            int(dead),
            int(expired),
            int(external),
            _ended(model, ended),
            int(deleted),
            int(back),
        )

    async def footprint(self, model: str, request_id: str) -> Footprint:
        """What a request holds in Redis now (its hash, event stream and owners) and when
        that expires; nothing when it is gone."""
        mk = ModelKeys(model)
        record = mk.request(request_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in (record, mk.request_events(request_id), mk.request_owners(request_id)):
                pipe.memory_usage(key, samples=0)
            pipe.pttl(record)
            *sizes, ttl_ms = await pipe.execute()
        if sizes[0] is None:
            return Footprint(0)
        size = sum(int(s or 0) for s in sizes) + REQUEST_INDEX_BYTES
        return Footprint(size, now_ms() + int(ttl_ms) if int(ttl_ms) > 0 else 0)
