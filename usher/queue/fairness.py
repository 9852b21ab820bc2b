"""Fair ordering of one model's queue, as pure functions.

Order: priority class first (with aging), then start-time fair queuing (SFQ) across tenant
flows with token cost and tenant weights, then arrival. Everything is folded into one score
fixed at enqueue, so a sorted set gives positions as an O(log n) rank:

    start  = max(queue virtual time, flow's last finish tag)
    finish = start + cost / weight
    score  = start + priority_lead * (class - 1)

The priority lead is measured in virtual tokens, not seconds: a lower class waits behind
at most ``lead`` tokens of higher-class work that arrives after it, then its score comes
due. That is aging by served work, so no class starves however busy a higher one is.

A flow is (tenant, priority class): a tenant's low-priority batch does not push back its
own interactive requests. Output length is unknown at enqueue, so the cost charges an
estimate and ``corrected_finish`` settles the difference when the request completes (as
Kubernetes API Priority and Fairness corrects its work estimate).

The Lua scripts (enqueue.lua, claim.lua, complete.lua) apply exactly these formulas
atomically; ``FairQueue`` is the in-memory reference model the tests and benchmarks use.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

__all__ = [
    "DEFAULT_PRIORITY_LEAD",
    "NORMAL_CLASS",
    "PRIORITY_CLASSES",
    "FairQueue",
    "QueuedItem",
    "Tags",
    "advance_vtime",
    "corrected_finish",
    "enqueue_tags",
    "estimate_cost",
    "estimate_tokens",
    "flow_class",
    "flow_key",
    "priority_class",
]

#: Priority classes, 1 = critical ... 5 = batch (the proto's Priority enum values).
PRIORITY_CLASSES = range(1, 6)
NORMAL_CLASS = 3
#: Virtual tokens of higher-class work a request yields to per class step.
DEFAULT_PRIORITY_LEAD = 20_000.0
#: A rough tokens-per-character ratio for estimating prompt size without a tokenizer.
CHARS_PER_TOKEN = 4


def priority_class(priority: int) -> int:
    """The class a proto Priority value sorts as (UNSPECIFIED counts as NORMAL)."""
    return NORMAL_CLASS if priority == 0 else priority


def flow_key(tenant: str, klass: int) -> str:
    """The fairness flow of a tenant's requests in one priority class."""
    return f"{tenant}|{klass}"


def flow_class(flow: str) -> int:
    """The priority class of a flow named by ``flow_key``."""
    return int(flow.rsplit("|", 1)[1])


def estimate_tokens(characters: int) -> int:
    """Tokens in a text of this many characters, rounded up (at least 1)."""
    return max(1, math.ceil(characters / CHARS_PER_TOKEN))


def estimate_cost(prompt_tokens: int, expected_output: float, num_predict: int | None) -> float:
    """Token cost charged at enqueue: prompt plus expected output, capped by num_predict."""
    output = expected_output
    if num_predict is not None and num_predict >= 0:
        output = min(output, float(num_predict))
    return float(prompt_tokens) + max(0.0, output)


@dataclass(frozen=True, slots=True)
class Tags:
    """What enqueue fixes for a request."""

    start: float
    finish: float
    score: float


def enqueue_tags(
    vtime: float,
    flow_finish: float,
    cost: float,
    weight: float,
    klass: int,
    lead: float = DEFAULT_PRIORITY_LEAD,
) -> Tags:
    """Start, finish and queue score of a request entering a queue at virtual time ``vtime``."""
    if weight <= 0:
        raise ValueError("weight must be positive")
    start = max(vtime, flow_finish)
    return Tags(start=start, finish=start + cost / weight, score=start + lead * (klass - 1))


def advance_vtime(vtime: float, claimed_start: float) -> float:
    """Queue virtual time after a request with start tag ``claimed_start`` is dispatched."""
    return max(vtime, claimed_start)


def corrected_finish(
    flow_finish: float,
    estimated: float,
    actual: float,
    weight: float,
    last_start: float = float("-inf"),
) -> float:
    """A flow's finish tag once a request's actual token cost is known. Never below
    ``last_start``, the start tag of the flow's newest request: its later requests would
    otherwise overtake its earlier ones still queued (a flow stays first in, first out)."""
    return max(flow_finish + (actual - estimated) / weight, last_start)


@dataclass(order=True, slots=True)
class QueuedItem:
    score: float
    seq: int
    tenant: str = field(compare=False)
    klass: int = field(compare=False)
    cost: float = field(compare=False)
    start: float = field(compare=False)


@dataclass
class FairQueue:
    """In-memory reference model of one model's queue (what the Lua scripts do in Redis)."""

    lead: float = DEFAULT_PRIORITY_LEAD
    weights: dict[str, float] = field(default_factory=dict)
    vtime: float = 0.0
    finish: dict[str, float] = field(default_factory=dict)
    last_start: dict[str, float] = field(default_factory=dict)
    _heap: list[QueuedItem] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, tenant: str, cost: float, klass: int = NORMAL_CLASS) -> QueuedItem:
        key = flow_key(tenant, klass)
        tags = enqueue_tags(
            self.vtime,
            self.finish.get(key, 0.0),
            cost,
            self.weights.get(tenant, 1.0),
            klass,
            self.lead,
        )
        self.finish[key] = tags.finish
        self.last_start[key] = tags.start
        item = QueuedItem(tags.score, next(self._seq), tenant, klass, cost, tags.start)
        heapq.heappush(self._heap, item)
        return item

    def pop(self) -> QueuedItem:
        item = heapq.heappop(self._heap)
        self.vtime = advance_vtime(self.vtime, item.start)
        return item

    def settle(self, item: QueuedItem, actual: float) -> None:
        """``item`` completed having cost ``actual`` (complete.lua)."""
        key = flow_key(item.tenant, item.klass)
        self.finish[key] = corrected_finish(
            self.finish[key],
            item.cost,
            actual,
            self.weights.get(item.tenant, 1.0),
            self.last_start.get(key, float("-inf")),
        )

    def position(self, item: QueuedItem) -> int:
        """1-based place of ``item`` (O(n) here; Redis answers it with ZRANK)."""
        return 1 + sum(1 for other in self._heap if other < item)

    def __len__(self) -> int:
        return len(self._heap)
