"""Scheduler settings, from the environment (usher/settings.py: ``USHER_`` + the field's
name unless the field names its variable)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Literal, Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from services.scheduler.quotas import Limits
from usher.config import ConfigError
from usher.queue.records import QueueDefaults
from usher.queue.settings import QueueSettings
from usher.settings import comma_list, lowercase

__all__ = ["FALLBACK_POLICIES", "SchedulerSettings"]

#: USHER_FALLBACK_POLICY's values → FallbackPolicy numbers (request.proto).
FALLBACK_POLICIES = {"none": 1, "after_timeout": 2, "local_only": 3}
FallbackPolicyName = Literal["none", "after_timeout", "local_only"]


class SchedulerSettings(QueueSettings):
    listen: str = Field("127.0.0.1:50051", validation_alias="USHER_SCHEDULER_LISTEN")
    #: Submit answers only once this many Redis replicas hold the request (WAIT); 0 = off.
    redis_wait_replicas: int = Field(0, ge=0)
    redis_wait_timeout_ms: int = Field(1000, ge=1)
    #: Per-model defaults (those the Notifier reads too are in QueueSettings); each can be
    #: changed at runtime with UpdateQueueConfig.
    queue_timeout_seconds: float = Field(
        300.0, gt=0, validation_alias="USHER_QUEUE_TIMEOUT_SECONDS"
    )
    max_attempts: int = Field(3, ge=1)
    #: A failed attempt goes back to the queue after an exponential backoff with jitter:
    #: about this long after the first failure, doubling per attempt up to the maximum.
    retry_backoff_seconds: float = Field(1.0, ge=0)
    retry_backoff_max_seconds: float = Field(30.0, ge=0)
    lease_seconds: float = Field(30.0, gt=0)
    #: How long finished requests (and their results and events) stay readable.
    result_ttl_seconds: int = Field(86_400, ge=1)
    #: How long a dead letter waits for an operator to retry it before it is deleted with
    #: its data; 0 = until retried.
    dead_letter_retention_seconds: int = Field(7 * 86_400, ge=0)
    idempotency_ttl_seconds: int = Field(86_400, ge=1)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    #: Comma-separated; empty = every model.
    allowed_models: Annotated[frozenset[str], NoDecode] = frozenset()
    #: Fallback policy of requests that name none (and whose tenant and model set none);
    #: unset = after_timeout when the PRD's QUEUE_AUTO_FALLBACK_ENABLED is true, else none.
    fallback_policy: FallbackPolicyName | None = Field(
        None, validation_alias="USHER_FALLBACK_POLICY"
    )
    auto_fallback: bool = Field(False, validation_alias="QUEUE_AUTO_FALLBACK_ENABLED")
    #: deterministic: share identical greedy/seeded requests; always; off.
    dedup: Literal["deterministic", "always", "off"] = "deterministic"
    reap_interval_seconds: float = Field(0.25, gt=0)
    #: The Pool's gRPC address; empty = this replica only queues (no dispatching).
    pool_address: str = ""
    #: The token this replica presents to the Pool (a principal with the "service" role).
    service_token: str = ""
    #: Requests this replica runs at once; unset: one for each slot of the fleet, as the
    #: Pool lists it (services/scheduler/fleet.py).
    dispatch_concurrency: int | None = Field(None, ge=1)
    #: After a flow's answer, the next slot of its model waits this long for the flow's
    #: next request when the flow has been coming back that fast (anticipatory idling,
    #: services/scheduler/anticipation.py); 0 = never.
    dispatch_idle_seconds: float = Field(0.025, ge=0, le=1)
    #: Limits of every tenant without its own (SetTenantLimits); 0 = unlimited.
    tenant_requests_per_minute: int = Field(0, ge=0)
    tenant_tokens_per_minute: int = Field(0, ge=0)
    tenant_max_concurrent: int = Field(0, ge=0)
    #: Bytes one tenant may keep in Redis: queued requests and finished ones kept for the
    #: result TTL; 0 = unbounded.
    tenant_max_stored_bytes: int = Field(256 * 1024 * 1024, ge=0)

    _allowed_models = field_validator("allowed_models", mode="before")(comma_list)

    @field_validator("fallback_policy", "dedup", mode="before")
    @classmethod
    def _choice(cls, value: object) -> object:
        value = lowercase(value)
        return value.replace("-", "_") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.pool_address and not self.service_token:
            raise ConfigError(
                "USHER_SERVICE_TOKEN is needed to call the pool at USHER_POOL_ADDRESS"
            )
        if self.max_prompt_chars >= self.tenant_max_stored_bytes > 0:
            raise ConfigError(
                "USHER_TENANT_MAX_STORED_BYTES must exceed USHER_MAX_PROMPT_CHARS, "
                "or no request of the largest size could be queued"
            )
        return self

    def queue_defaults(self) -> QueueDefaults:
        return replace(
            super().queue_defaults(),
            queue_timeout_ms=int(self.queue_timeout_seconds * 1000),
            max_attempts=self.max_attempts,
            lease_ms=int(self.lease_seconds * 1000),
            result_ttl_seconds=self.result_ttl_seconds,
            dead_letter_retention_seconds=self.dead_letter_retention_seconds,
            idempotency_ttl_seconds=self.idempotency_ttl_seconds,
            wait_replicas=self.redis_wait_replicas,
            wait_timeout_ms=self.redis_wait_timeout_ms,
        )

    @property
    def default_fallback(self) -> int:
        """The FallbackPolicy number of requests that name none."""
        name = self.fallback_policy or ("after_timeout" if self.auto_fallback else "none")
        return FALLBACK_POLICIES[name]

    @property
    def tenant_limits(self) -> Limits:
        return Limits(
            requests_per_minute=self.tenant_requests_per_minute,
            tokens_per_minute=self.tenant_tokens_per_minute,
            max_concurrent=self.tenant_max_concurrent,
        )
