"""Every Redis key Usher uses, in one place.

Keys of one model share the hash tag ``{model}`` so that each Lua script touches a single
Redis Cluster slot. Scripts get the model's key base (``usher:{model}:``) and build the
same names from ``lua_key_header()``, which is rendered from the suffixes below, so the
names exist only here. Keys that span models (the id → model index, tenant listings, the
model set) are written before the scripts run, so a crash in between leaves only a dangling
index entry and never an unindexed request.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

__all__ = [
    "AUDIT",
    "AUDIT_ACTIVITY",
    "CANCELS",
    "MODELS",
    "MODEL_NAMES",
    "POOL_CAPACITY",
    "POOL_CATALOGUE",
    "POOL_DRAINING",
    "POOL_EXTERNAL",
    "POOL_HELD",
    "POOL_INSTANCES",
    "POOL_PLACEMENT_LOCK",
    "POOL_WEIGHTS",
    "TENANT_LIMITS",
    "TENANT_WEIGHTS",
    "InstanceKeys",
    "ModelKeys",
    "TenantKeys",
    "lua_key_header",
    "pool_model_stats",
    "request_index",
    "tenant_id",
    "tenant_requests",
]

PREFIX = "usher"

#: SET of every model that has ever had a queue.
MODELS = f"{PREFIX}:models"
#: SET of every model a Submit named, kept when a model leaves the fleet (MODELS drops it
#: while its requests' records live on): a request id ends with its model's tag
#: (usher/ids.py), and a lookup by id alone asks the models with that tag.
MODEL_NAMES = f"{PREFIX}:model-names"
#: HASH "org/user" or "org/" → weight (float as text).
TENANT_WEIGHTS = f"{PREFIX}:tenant-weights"
#: HASH "org/user" or "org/" → JSON limits (requests/min, tokens/min, concurrency, cap).
TENANT_LIMITS = f"{PREFIX}:tenant-limits"
#: STREAM of audit events of admin actions (who, what, when, outcome), written only for
#: callers that authenticated with the admin role, so no one else can push them out.
AUDIT = f"{PREFIX}:audit"
#: STREAM of the other audit events: tenants' submits, cancels, provider switches, and
#: per-interval summaries of refused admin calls (anonymous or without the role).
AUDIT_ACTIVITY = f"{PREFIX}:audit:activity"
#: Pub/sub CHANNEL of request ids whose cancel was asked for while running: the owning
#: dispatcher stops at once (the flag its heartbeat reads remains the reliable path).
CANCELS = f"{PREFIX}:cancels"

# Per-model keys: base + suffix. What each holds:
_MODEL_SUFFIXES = {
    # ZSET member "<seq>:<id>" → fair-order score, lowest first.
    "queue": "queue",
    # ZSET request id → lease expiry (ms) of requests being run.
    "leases": "leases",
    # ZSET request id → when its queue timeout or deadline passes (ms) while queued.
    "deadlines": "deadlines",
    # ZSET member → score of requests handed to the external provider.
    "external": "external",
    # ZSET request id → when it was dead-lettered (ms).
    "dead_letters": "dead",
    # ZSET request id → when its retry backoff ends (ms): a failed attempt's request waits
    # here, QUEUED but out of line, until the reaper puts it back in its place.
    "retrying": "retrying",
    # HASH of runtime-updatable limits (max_queue_size, queue_timeout_ms, ...).
    "config": "config",
    # HASH "vtime" → queue virtual time; "flow:<tenant>|<class>" → flow finish tag;
    # "act:<flow>" → the flow's recent arrivals, for ETAs ("act_since": counted since, ms);
    # "paused" → a copy of the config's paused flag (claim reads it with "vtime");
    # "config:<name>" → copies of the config's queue size, attempts and queue timeout, and
    # "config" → "1" once they are there (enqueue reads them with the fair tags);
    # the figures of completed work (usher/queue/records.py: COMPLETION_COUNTERS and
    # COMPLETION_AVERAGES), and "figures" → "1" once they moved here from "stats"
    # (complete.lua reads and writes them with the flow's tags).
    "fairness": "fairness",
    # ZSET flow → when it last sent (ms): the flows an ETA expects to keep sending.
    "flows": "flows",
    # HASH of the other counters (expired, rejected, deduplicated, and outcomes a script
    # other than complete.lua records), and the figures as they were before they moved to
    # "fairness".
    "stats": "stats",
    # STRING arrival counter.
    "sequence": "seq",
    # STREAM of every state change of this model's requests.
    "events": "events",
}
# Per-request keys: base + REQUEST + id [+ suffix].
_REQUEST = "req:"
_REQUEST_EVENTS = ":events"
_REQUEST_OWNERS = ":owners"
_DEDUP = "dedup:"
_IDEMPOTENCY = "idem:"
# STRING present while a model that left the fleet has its keys expiring (retire.lua).
_RETIRED = "retired"
_REFUSED = "refused:"


def _escape(part: str) -> str:
    # Percent-encoding leaves letters, digits and "_.-~" alone, so ordinary names read as
    # before, and no "/", ":", "|", "%", "{" or "}" of a name can survive into a key.
    return quote(part, safe="")


def tenant_id(organization: str, user: str) -> str:
    """The one identity of a caller in every key and field derived from it: "org/user",
    each part percent-encoded, so no two (organization, user) pairs give the same text
    (org "a/b" + user "c" is "a%2Fb/c", org "a" + user "b/c" is "a/b%2Fc"), the text has
    no ":" (idempotency keys append one) nor braces (it is a Redis Cluster hash tag).
    An empty user is the organization's default entry ("org/")."""
    return f"{_escape(organization)}/{_escape(user)}"


def request_index(request_id: str) -> str:
    """STRING request id → model name, written for requests made before ids carried their
    model's tag (MODEL_NAMES): read, as a last resort, by lookups of such ids."""
    return f"{PREFIX}:request-model:{request_id}"


def tenant_requests(tenant: str) -> str:
    """ZSET of a caller's ("org/user") request ids scored by creation time (ms), for List."""
    return f"{PREFIX}:tenant:{tenant}:requests"


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """Quota state of one caller (``tenant_id``), in one hash slot."""

    tenant: str

    @property
    def buckets(self) -> str:
        """HASH of token-bucket levels (requests, tokens) and when they were last set."""
        return f"{PREFIX}:tenant:{{{self.tenant}}}:buckets"

    @property
    def live(self) -> str:
        """ZSET request id → when the entry lapses (ms): the caller's live requests."""
        return f"{PREFIX}:tenant:{{{self.tenant}}}:live"

    @property
    def stored(self) -> str:
        """ZSET request id → when its storage charge lapses (ms): every request the caller
        has in Redis, queued or finished and kept for the result TTL."""
        return f"{PREFIX}:tenant:{{{self.tenant}}}:stored"

    @property
    def stored_bytes(self) -> str:
        """HASH request id → bytes charged for it, "lapse:<id>" → when that charge lapses
        (as ``stored`` holds it), and "total" → their sum."""
        return f"{PREFIX}:tenant:{{{self.tenant}}}:stored-bytes"


def model_base(model: str) -> str:
    return f"{PREFIX}:{{{model}}}:"


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """The keys of one model's queue, all in the same hash slot."""

    model: str

    @property
    def base(self) -> str:
        return model_base(self.model)

    def _k(self, name: str) -> str:
        return self.base + _MODEL_SUFFIXES[name]

    queue = property(lambda self: self._k("queue"))
    leases = property(lambda self: self._k("leases"))
    deadlines = property(lambda self: self._k("deadlines"))
    external = property(lambda self: self._k("external"))
    dead_letters = property(lambda self: self._k("dead_letters"))
    retrying = property(lambda self: self._k("retrying"))
    config = property(lambda self: self._k("config"))
    fairness = property(lambda self: self._k("fairness"))
    flows = property(lambda self: self._k("flows"))
    stats = property(lambda self: self._k("stats"))
    sequence = property(lambda self: self._k("sequence"))
    events = property(lambda self: self._k("events"))

    @property
    def wait_barrier(self) -> str:
        """STRING written just before a Redis WAIT on a connection that wrote nothing else
        to this model (a replica holding it holds every earlier write to the model)."""
        return self.base + "wait-barrier"

    @property
    def retired(self) -> str:
        """STRING set (with the keys' expiry) when the model left the fleet and its keys
        expire; enqueue persists them again when it sees it."""
        return self.base + _RETIRED

    def admission_refused(self, request_id: str) -> str:
        """STRING set by an admission refused in the same round trip as the request's
        enqueue (a Redis that is not a Cluster): enqueue.lua then queues nothing."""
        return f"{self.base}{_REFUSED}{request_id}"

    def request(self, request_id: str) -> str:
        """HASH of one request: metadata, payload, result."""
        return f"{self.base}{_REQUEST}{request_id}"

    def request_events(self, request_id: str) -> str:
        """STREAM of one request's events (states, tokens), for resumable watches."""
        return f"{self.request(request_id)}{_REQUEST_EVENTS}"

    def request_owners(self, request_id: str) -> str:
        """SET of "org/user" callers sharing one (deduplicated) request."""
        return f"{self.request(request_id)}{_REQUEST_OWNERS}"

    def dedup(self, fingerprint: str) -> str:
        """STRING fingerprint of a deterministic live request → its id."""
        return f"{self.base}{_DEDUP}{fingerprint}"

    def idempotency(self, tenant: str, key: str) -> str:
        """STRING (caller, idempotency key) → request id."""
        return f"{self.base}{_IDEMPOTENCY}{tenant}:{key}"


def lua_key_header() -> str:
    """Lua that defines the same key names from ARGV[1] (the model's key base)."""
    lines = ["local BASE = ARGV[1]", "local K = {"]
    lines += [f"  {name} = BASE .. '{suffix}'," for name, suffix in _MODEL_SUFFIXES.items()]
    lines += [
        "}",
        f"local function req_key(id) return BASE .. '{_REQUEST}' .. id end",
        f"local function req_events_key(id) return req_key(id) .. '{_REQUEST_EVENTS}' end",
        f"local function req_owners_key(id) return req_key(id) .. '{_REQUEST_OWNERS}' end",
        f"local function dedup_key(fp) return BASE .. '{_DEDUP}' .. fp end",
        f"local function idem_key(t, k) return BASE .. '{_IDEMPOTENCY}' .. t .. ':' .. k end",
        f"local RETIRED = BASE .. '{_RETIRED}'",
        f"local function refused_key(id) return BASE .. '{_REFUSED}' .. id end",
    ]
    return "\n".join(lines) + "\n"


# ---- Pool ------------------------------------------------------------------------------------
# Slot keys of one instance share the hash tag {pool:<instance>}, so reserving checks and
# takes a slot in one script on one Cluster slot.

#: HASH instance id → serialized InstanceConfig registered at runtime (shared by replicas).
POOL_INSTANCES = f"{PREFIX}:pool:instances"
#: SET of instance ids that take no new work.
POOL_DRAINING = f"{PREFIX}:pool:draining"
#: HASH instance id → weight set at runtime (overrides the configured one).
POOL_WEIGHTS = f"{PREFIX}:pool:weights"
#: HASH "<instance id>/<model>" → until when (epoch ms; -1: until unloaded by hand) a model
#: loaded with LoadModel's keep_alive stays loaded there, like a preload.
POOL_HELD = f"{PREFIX}:pool:held"
#: HASH model → slots the healthy fleet offers for it now (written by the Pool's health
#: pass, read by the Scheduler for ETAs and by the Notifier for badges).
POOL_CAPACITY = f"{PREFIX}:pool:capacity"
#: HASH model → unix ms when an instance last offered it (listed, loaded, allowed or
#: preloaded; written by every Pool's health pass): the fleet's catalogue. Submit refuses
#: other names with NOT_FOUND, so a made-up model name creates nothing.
POOL_CATALOGUE = f"{PREFIX}:pool:catalogue"
#: STRING "1" while some Pool sees a healthy external provider (set with a short expiry by
#: every health pass): the Scheduler hands requests to it when no local instance serves.
POOL_EXTERNAL = f"{PREFIX}:pool:external"
#: STRING held by the replica that runs the placement pass (SET NX PX).
POOL_PLACEMENT_LOCK = f"{PREFIX}:pool:placement-lock"


def pool_model_stats(model: str) -> str:
    """HASH of counters and moving averages of one model across the fleet."""
    return f"{PREFIX}:pool:model-stats:{model}"


@dataclass(frozen=True, slots=True)
class InstanceKeys:
    """Slot accounting of one model-server instance."""

    instance: str

    @property
    def base(self) -> str:
        return f"{PREFIX}:pool:{{{self.instance}}}:"

    @property
    def slots(self) -> str:
        """ZSET slot id → lease expiry (ms), every model."""
        return f"{self.base}slots"

    def model_slots(self, model: str) -> str:
        """ZSET slot id → lease expiry (ms), one model."""
        return f"{self.base}model-slots:{model}"
