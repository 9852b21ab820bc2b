"""The per-model defaults that the queue's writer and its readers must agree on.

The Scheduler queues, claims and charges by them. The Notifier computes positions, ETAs and
badges from the same figures ("full" is the queue's limit). So both services read them
from the same variables, which the deployments share (deploy/k8s: usher-config), and an
operator's UpdateQueueConfig overrides them per model for both, in Redis.
"""

from __future__ import annotations

from pydantic import Field

from usher.queue.fairness import DEFAULT_PRIORITY_LEAD
from usher.queue.records import QueueDefaults
from usher.settings import ServiceSettings

__all__ = ["QueueSettings"]


class QueueSettings(ServiceSettings):
    max_queue_size: int = Field(100, ge=1, validation_alias="USHER_QUEUE_MAX_SIZE")
    parallel: int = Field(1, ge=1, validation_alias="USHER_DEFAULT_PARALLEL")
    priority_lead: float = Field(
        DEFAULT_PRIORITY_LEAD, ge=0, validation_alias="USHER_PRIORITY_LEAD_TOKENS"
    )
    #: Output tokens charged for a request before the model's average is known.
    default_output_tokens: float = Field(256.0, gt=0)

    def queue_defaults(self) -> QueueDefaults:
        return QueueDefaults(
            max_queue_size=self.max_queue_size,
            parallel=self.parallel,
            priority_lead=self.priority_lead,
            default_output_tokens=self.default_output_tokens,
        )
