"""The read side of the request queue on Redis: records, places, models, averages.

The Notifier reads the queue through a ``QueueReader``; the Scheduler's ``QueueStore``
(services/scheduler/store.py) is one too, with the writes added. Scripts load by name from
the packages given (each package's ``lua/`` folder), after the key header and the queue's
shared library (usher/queue/lua/_lib.lua), and are called by SHA.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, ClassVar, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from usher import keys
from usher.connections import is_cluster
from usher.crypto import NullSealer
from usher.ids import model_tag, tag_of
from usher.keys import ModelKeys
from usher.queue import eta
from usher.queue.eta import ModelAverages
from usher.queue.records import QUEUED, ModelConfig, QueueDefaults, StoredRequest, decode, pairs
from usher.v1 import request_pb2

__all__ = [
    "AVERAGES_CACHE_SECONDS",
    "CLUSTER_POLL_SECONDS",
    "BadgeCounts",
    "Entries",
    "QueueReader",
    "Scripts",
    "StreamReply",
    "WatchStart",
    "now_ms",
]

#: Model averages (with the fair clock and running count ETAs start from) at most this
#: often: the clock moves with every claim, and a second-old one overstates waits.
AVERAGES_CACHE_SECONDS = 0.1
#: How long the model names read for lookups by id alone are used: they are read again at
#: once when an id's tag matches none (a new model's first Submit since, or an id made
#: before ids carried the tag).
MODEL_NAMES_CACHE_SECONDS = 5.0
#: On a Redis Cluster the event streams are polled (no blocking read spans slots): how long
#: to rest after a read that found nothing. A watcher's extra latency is half this on average.
CLUSTER_POLL_SECONDS = 0.05

#: XREAD's answer: (stream, [(entry id, fields)]) per stream with new entries.
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class BadgeCounts:
    """What a model's badge counts: waiting, running on the fleet's slots, and running at
    the external provider (no slot: a badge's running/capacity must not count them)."""

    queued: int
    running: int
    external_running: int = 0


#: A stream's entries as read: (entry id, fields), decoded.
Entries = list[tuple[str, dict[str, str]]]


@dataclass(frozen=True, slots=True)
class WatchStart:
    """What a watch opens on, read at one instant: the request (prompt left out, owners
    and place in), its own events after the id asked for, and the id it stands at (its
    stream's last event, the record as that event left it; the id asked for when none
    follows it, and from the start past the first event, which is not in the stream)."""

    stored: StoredRequest
    events: Entries
    tip: str = "0-0"


def _entries(raw: Any) -> Entries:
    """Stream entries decoded (XRANGE through redis-py gives dicts, from a script flat lists)."""
    found: Entries = []
    for entry_id, fields in raw or ():
        if not isinstance(fields, dict):
            fields = pairs(fields)
        found.append((entry_id.decode(), {k.decode(): v.decode() for k, v in fields.items()}))
    return found


_EXTERNAL_ROUTE = str(request_pb2.ROUTE_EXTERNAL).encode()


def _is_external(route: bytes | None) -> bool:
    return route == _EXTERNAL_ROUTE


class Scripts:
    """Lua scripts by name, each prefixed with the key header and the shared library."""

    def __init__(self, client: aioredis.Redis, packages: Mapping[str, Sequence[str]]) -> None:
        library = (resources.files("usher.queue") / "lua" / "_lib.lua").read_text()
        prelude = keys.lua_key_header() + library
        self.by_name: dict[str, AsyncScript] = {}
        for package, names in packages.items():
            folder = resources.files(package) / "lua"
            for name in names:
                text = (folder / f"{name}.lua").read_text()
                self.by_name[name] = client.register_script(prelude + text)

    def __getitem__(self, name: str) -> AsyncScript:
        return self.by_name[name]


class QueueReader:
    """Reads of per-model fair queues and the request records, on one Redis."""

    #: The scripts to load: package → names of the ``lua/<name>.lua`` files it holds.
    SCRIPTS: ClassVar[Mapping[str, Sequence[str]]] = {"usher.queue": ("inspect", "watch")}

    def __init__(
        self,
        client: aioredis.Redis,
        defaults: QueueDefaults | None = None,
        sealer: NullSealer | None = None,
    ) -> None:
        self.redis = client
        self.defaults = defaults or QueueDefaults()
        #: Encrypts prompts and results at rest (a NullSealer when no key is configured).
        self.sealer = sealer or NullSealer()
        self._scripts = Scripts(client, self.SCRIPTS)
        self._averages: dict[str, tuple[float, ModelAverages, int]] = {}
        self._averages_reads: dict[str, asyncio.Future[tuple[ModelAverages, int]]] = {}
        #: When the model names were read, and the names by their tag.
        self._names: tuple[float, dict[str, list[str]]] = (-float("inf"), {})

    def _stored(
        self,
        raw: dict[bytes, bytes],
        owners: frozenset[str] = frozenset(),
        position: int = 0,
        queue_length: int = 0,
    ) -> StoredRequest:
        """A request read from Redis, its prompt and result decrypted."""
        stored = StoredRequest.from_hash(raw, owners, position, queue_length)
        return replace(
            stored,
            payload=self.sealer.open(stored.payload, stored.id),
            result=self.sealer.open(stored.result, stored.id) if stored.result else b"",
        )

    async def _run(self, name: str, model: str, args: Sequence[Any], now: int | None = None) -> Any:
        mk = ModelKeys(model)
        stamp = now_ms() if now is None else now
        return await self._scripts[name](keys=[mk.queue], args=[mk.base, stamp, *args])

    def _queue_script(self, pipe: Pipeline, name: str, model: str, args: Sequence[Any]) -> None:
        """Add a script call to a pipeline by SHA (no per-call SCRIPT EXISTS round trip)."""
        mk = ModelKeys(model)
        pipe.evalsha(self._scripts[name].sha, 1, mk.queue, mk.base, now_ms(), *args)

    async def _execute(
        self,
        build: Callable[[Pipeline], None],
        *,
        raise_on_error: bool = True,
        others: Sequence[AsyncScript] = (),
        repeated: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Run a pipeline; if Redis lost its script cache (a restart), load and run it again
        (``build`` is called again). Every command in our pipelines is safe to repeat, or
        left out of the second attempt by its ``build`` (``repeated``).
        ``raise_on_error`` False: an error stands in place of a command that failed.
        ``others``: scripts not of this store that the pipeline calls (loaded again too).
        ``repeated``: given the first attempt's replies when it is sent again (what ran of
        it, before ``build`` is called the second time)."""
        for attempt in (1, 2):
            async with self.redis.pipeline(transaction=False) as pipe:
                build(pipe)
                try:
                    replies = list(await pipe.execute(raise_on_error=raise_on_error))
                except NoScriptError:
                    if attempt == 2:
                        raise
                else:
                    lost = any(isinstance(reply, NoScriptError) for reply in replies)
                    if not lost or attempt == 2:
                        return replies
                    if repeated is not None:
                        repeated(replies)
            for script in (*self._scripts.by_name.values(), *others):
                await self.redis.script_load(script.script)
        raise AssertionError("unreachable")

    # Typed reads: our client keeps decode_responses=False, so members and fields are bytes.

    async def _hgetall(self, key: str) -> dict[bytes, bytes]:
        return cast("dict[bytes, bytes]", await self.redis.hgetall(key))

    # ---- read -----------------------------------------------------------------------------

    async def model_of(self, request_id: str) -> str | None:
        return (await self.models_of([request_id]))[0]

    async def models_of(self, request_ids: Sequence[str]) -> list[str | None]:
        """The model each request lives under (None: no such request), in one round trip:
        each model whose tag the id ends with (usher/ids.py) asked whether it holds the
        request, and the index entry of a request made before ids carried the tag."""
        tagged = await self._models_tagged([tag_of(i) for i in request_ids])
        # EXISTS and GETs in a pipeline: the keys lie in different Cluster slots.
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                for model in tagged.get(tag_of(request_id), ()):
                    pipe.exists(ModelKeys(model).request(request_id))
                pipe.get(keys.request_index(request_id))
            replies = iter(await pipe.execute())
        found: list[str | None] = []
        for request_id in request_ids:
            held = [m for m in tagged.get(tag_of(request_id), ()) if next(replies)]
            indexed = next(replies)
            found.append(held[0] if held else decode(indexed) if indexed else None)
        return found

    async def _models_tagged(self, tags: Sequence[str]) -> dict[str, list[str]]:
        """Model names by tag (cached; read again when a tag asked for matches none): every
        model a Submit named, and the live ones (a lost write of the former is made good)."""
        read_at, by_tag = self._names
        fresh = time.monotonic() - read_at < MODEL_NAMES_CACHE_SECONDS
        if fresh and all(tag in by_tag for tag in tags):
            return by_tag
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(keys.MODEL_NAMES)
            pipe.smembers(keys.MODELS)
            named, live = await pipe.execute()
        by_tag = {}
        for name in sorted({decode(m) for m in (*named, *live)}):
            by_tag.setdefault(model_tag(name), []).append(name)
        self._names = (time.monotonic(), by_tag)
        return by_tag

    async def get(self, request_id: str) -> StoredRequest | None:
        model = await self.model_of(request_id)
        if model is None:
            return None
        return await self.inspect(model, request_id)

    async def inspect(self, model: str, request_id: str) -> StoredRequest | None:
        reply = await self._run("inspect", model, [request_id])
        if reply is None:
            return None
        flat, owners, position, length = reply
        return self._stored(
            pairs(flat), frozenset(o.decode() for o in owners), int(position), int(length)
        )

    async def open_watch(self, model: str, request_id: str, after: str) -> WatchStart | None:
        """The request under ``model`` with its events after ``after``, in one round trip;
        None when ``model`` holds no such request."""
        reply = await self._run("watch", model, [request_id, after])
        if reply is None:
            return None
        flat, owners, position, length, events, tip = reply
        stored = StoredRequest.from_hash(
            pairs(flat), frozenset(o.decode() for o in owners), int(position), int(length)
        )
        if stored.result:
            stored = replace(stored, result=self.sealer.open(stored.result, request_id))
        return WatchStart(stored, _entries(events), decode(tip))

    async def models(self) -> list[str]:
        return sorted(decode(m) for m in await self.redis.smembers(keys.MODELS))

    async def queue_length(self, model: str) -> int:
        length: int = await self.redis.zcard(ModelKeys(model).queue)
        return length

    def cached_averages(self, model: str) -> ModelAverages:
        """The averages last read for ``model`` (defaults when never read)."""
        cached = self._averages.get(model)
        if cached is None:
            return ModelAverages(30.0, output_tokens=self.defaults.default_output_tokens)
        return cached[1]

    async def model_averages(self, model: str) -> tuple[ModelAverages, int]:
        """Moving averages and parallel slots of a model (cached briefly). Slots are the
        operator's setting if any, else what the Pool last reported, else the default.
        One read at a time per model: callers arriving meanwhile share its answer rather
        than pile their own reads onto the connection pool."""
        cached = self._averages.get(model)
        if cached and cached[0] > time.monotonic():
            return cached[1], cached[2]
        reading = self._averages_reads.get(model)
        if reading is None:
            reading = asyncio.ensure_future(self._read_averages(model))
            self._averages_reads[model] = reading
            reading.add_done_callback(lambda _: self._averages_reads.pop(model, None))
        return await asyncio.shield(reading)

    async def _read_averages(self, model: str) -> tuple[ModelAverages, int]:
        now = time.monotonic()
        mk = ModelKeys(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            averages_at = ["service_ms", "service_var", "output_tokens", "tokens_per_s"]
            pipe.hmget(mk.stats, averages_at)
            pipe.hget(mk.config, "parallel")
            pipe.hget(keys.POOL_CAPACITY, model)
            # complete.lua keeps the averages here (a model's older ones: its stats hash).
            pipe.hmget(mk.fairness, ["vtime", "act_since", *averages_at])
            pipe.zcard(mk.leases)
            active_since = now_ms() - eta.ACTIVE_FLOW_SECONDS * 1000
            pipe.zrevrangebyscore(mk.flows, "+inf", active_since, start=0, num=eta.MAX_FLOWS)
            (
                former,
                parallel,
                capacity,
                (vtime, since, *moved),
                running,
                flow_names,
            ) = await pipe.execute()
        service, variance, output, tps = (
            new if new is not None else old for new, old in zip(moved, former, strict=True)
        )
        averages = ModelAverages(
            service_seconds=float(service) / 1000 if service else 30.0,
            service_variance=float(variance) / 1e6 if variance else 0.0,
            output_tokens=float(output) if output else self.defaults.default_output_tokens,
            tokens_per_second=float(tps) if tps else 0.0,
            virtual_time=float(vtime) if vtime else 0.0,
            running=int(running),
            flows=await self._flow_activity(mk, flow_names, since),
            priority_lead=self.defaults.priority_lead,
        )
        slots = int(parallel or capacity or 0) or self.defaults.parallel
        self._averages[model] = (now + AVERAGES_CACHE_SECONDS, averages, slots)
        return averages, slots

    async def _flow_activity(
        self, mk: ModelKeys, names: Sequence[bytes], since: bytes | None
    ) -> tuple[eta.FlowActivity, ...]:
        """The recently active flows of a model: finish tags and arrival rates (for ETAs)."""
        if not names or since is None:
            return ()
        flows = [name.decode() for name in names]
        fields = [f"{prefix}{flow}" for flow in flows for prefix in ("flow:", "act:")]
        values = await self.redis.hmget(mk.fairness, fields)
        now, observed_since = time.time(), float(since) / 1000
        found = []
        for i, flow in enumerate(flows):
            finish, record = values[2 * i], values[2 * i + 1]
            if record:
                activity = eta.activity_from_record(
                    flow, float(finish or 0), decode(record), now, observed_since
                )
                if activity is not None:
                    found.append(activity)
        return tuple(found)

    async def config(self, model: str) -> ModelConfig:
        raw = await self._hgetall(ModelKeys(model).config)
        return ModelConfig.from_hash(model, raw, self.defaults)

    # ---- for watchers: events, places, counts ---------------------------------------------

    async def request_events(self, model: str, request_id: str, after: str) -> Entries:
        """The entries of a request's own event stream after id ``after``, decoded."""
        key = ModelKeys(model).request_events(request_id)
        return _entries(await self.redis.xrange(key, f"({after}", "+"))

    async def events_end(self, model: str) -> str:
        """The id of the last entry of the model's event stream ("0-0" when it is empty)."""
        last = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await self.redis.xrevrange(ModelKeys(model).events, count=1),
        )
        return last[0][0].decode() if last else "0-0"

    async def read_streams(self, streams: dict[str, str], block_ms: int) -> StreamReply:
        """New entries of the given streams (name → last id seen): one blocking XREAD on a
        single Redis; on a Cluster, whose XREAD cannot span slots, one non-blocking XREAD per
        slot in one pipelined round trip per node, polled every CLUSTER_POLL_SECONDS while
        nothing arrives (a blocking read per slot would hold a connection per model)."""
        if not is_cluster(self.redis):
            reply = await self.redis.xread(streams, count=2000, block=block_ms)  # type: ignore[arg-type]
            return cast(StreamReply, reply or [])
        by_slot: dict[int, dict[str, str]] = {}
        for stream, last in streams.items():
            by_slot.setdefault(key_slot(stream.encode()), {})[stream] = last
        async with self.redis.pipeline(transaction=False) as pipe:
            for group in by_slot.values():
                pipe.xread(group, count=2000)  # type: ignore[arg-type]
            replies = cast(list[StreamReply | None], await pipe.execute())
        found = [item for reply in replies for item in (reply or [])]
        if not found:
            await asyncio.sleep(min(block_ms / 1000, CLUSTER_POLL_SECONDS))
        return found

    async def watched_requests(
        self, wanted: Mapping[str, str]
    ) -> tuple[dict[str, StoredRequest | None], dict[str, bytes]]:
        """The current records of the given requests (id → model), in one round trip (two
        when some are queued: their places), prompts left out; None for one that is gone.
        Also the queue members of those that have one (id → member)."""
        ids = list(wanted)
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(ModelKeys(wanted[request_id]).request(request_id))
            raws = cast(list[dict[bytes, bytes]], await pipe.execute())
        found: dict[str, StoredRequest | None] = {}
        members: dict[str, bytes] = {}
        queued: list[tuple[str, bytes]] = []
        sealer = self.sealer
        for request_id, raw in zip(ids, raws, strict=True):
            if not raw:
                found[request_id] = None
                continue
            raw.pop(b"payload", None)  # the prompt: watchers never show it
            stored = StoredRequest.from_hash(raw)
            if stored.result:
                stored = replace(stored, result=sealer.open(stored.result, request_id))
            found[request_id] = stored
            member = raw.get(b"member")
            if member:
                members[request_id] = member
            if stored.state == QUEUED and member:
                queued.append((request_id, member))
        if queued:
            async with self.redis.pipeline(transaction=False) as pipe:
                for request_id, member in queued:
                    queue = ModelKeys(wanted[request_id]).queue
                    pipe.zrank(queue, member)
                    pipe.zcard(queue)
                places = cast(list[int | None], await pipe.execute())
            for i, (request_id, _) in enumerate(queued):
                rank, length = places[2 * i], places[2 * i + 1]
                record = found[request_id]
                if rank is not None and record is not None:
                    found[request_id] = replace(
                        record, position=int(rank) + 1, queue_length=int(length or 0)
                    )
        return found, members

    async def queue_members(self, model: str) -> list[bytes]:
        """The model's whole queue in fair order."""
        return cast(list[bytes], await self.redis.zrange(ModelKeys(model).queue, 0, -1))

    async def members_of(self, model: str, request_ids: Sequence[str]) -> list[bytes | None]:
        """The queue members of the given requests (None: it has none), in one round trip."""
        mk = ModelKeys(model)
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hget(mk.request(request_id), "member")
            return cast(list[bytes | None], await pipe.execute())

    async def ranks(self, model: str, members: Sequence[bytes]) -> list[int | None]:
        """0-based ranks of the given members in the model's queue (None: not in it)."""
        queue = ModelKeys(model).queue
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.zrank(queue, member)
            return cast(list[int | None], await pipe.execute())

    async def badge_counts(self, models: Sequence[str]) -> tuple[list[BadgeCounts], bool]:
        """Each model's queued requests and running ones, those on the fleet's slots apart
        from those the external provider answers (both hold a lease; a request's route
        tells them apart), and whether some Pool sees an external provider: two round
        trips."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.zcard(ModelKeys(model).queue)
                pipe.zrange(ModelKeys(model).leases, 0, -1)
            pipe.exists(keys.POOL_EXTERNAL)
            *replies, external = await pipe.execute()
        queued = [int(cast(int, replies[2 * i])) for i in range(len(models))]
        leased = [cast(list[bytes], replies[2 * i + 1]) for i in range(len(models))]
        routes: list[bytes | None] = []
        if any(leased):
            async with self.redis.pipeline(transaction=False) as pipe:
                for model, ids in zip(models, leased, strict=True):
                    for request_id in ids:
                        pipe.hget(ModelKeys(model).request(request_id.decode()), "route")
                routes = cast(list[bytes | None], await pipe.execute())
        counts, taken = [], 0
        for waiting, ids in zip(queued, leased, strict=True):
            mine, taken = routes[taken : taken + len(ids)], taken + len(ids)
            outside = sum(1 for route in mine if _is_external(route))
            counts.append(BadgeCounts(waiting, len(ids) - outside, outside))
        return counts, bool(external)
