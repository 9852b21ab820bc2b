"""Scheduler settings, from the environment (every name starts with USHER_)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.scheduler.quotas import Limits
from usher.auth import Principal, load_token_map
from usher.config import ConfigError, env_float, env_int, env_list, env_str
from usher.queue.fairness import DEFAULT_PRIORITY_LEAD

__all__ = ["FALLBACK_POLICIES", "SchedulerSettings"]

#: USHER_FALLBACK_POLICY's values → FallbackPolicy numbers (request.proto).
FALLBACK_POLICIES = {"none": 1, "after_timeout": 2, "local_only": 3}


def _fallback_policy(env: Mapping[str, str] | None) -> int:
    """USHER_FALLBACK_POLICY, else the PRD's QUEUE_AUTO_FALLBACK_ENABLED=true (after_timeout)."""
    name = env_str("USHER_FALLBACK_POLICY", "", env).strip().lower().replace("-", "_")
    if not name:
        auto = env_str("QUEUE_AUTO_FALLBACK_ENABLED", "", env).strip().lower()
        name = "after_timeout" if auto in ("1", "true", "yes", "on") else "none"
    if name not in FALLBACK_POLICIES:
        raise ConfigError(
            f"USHER_FALLBACK_POLICY must be one of {', '.join(FALLBACK_POLICIES)}, got {name!r}"
        )
    return FALLBACK_POLICIES[name]


DEDUP_MODES = ("deterministic", "always", "off")


@dataclass(frozen=True)
class SchedulerSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Submit answers only once this many Redis replicas hold the request (WAIT); 0 = off.
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    listen: str = "127.0.0.1:50051"
    tokens: Mapping[str, Principal] = field(default_factory=dict)
    #: Per-model defaults; each can be changed at runtime with UpdateQueueConfig.
    max_queue_size: int = 100
    queue_timeout_seconds: float = 300.0
    max_attempts: int = 3
    #: A failed attempt goes back to the queue after an exponential backoff with jitter:
    #: about this long after the first failure, doubling per attempt up to the maximum.
    retry_backoff_seconds: float = 1.0
    retry_backoff_max_seconds: float = 30.0
    lease_seconds: float = 30.0
    parallel: int = 1
    #: How long finished requests (and their results and events) stay readable.
    result_ttl_seconds: int = 86_400
    idempotency_ttl_seconds: int = 86_400
    priority_lead: float = DEFAULT_PRIORITY_LEAD
    #: Output tokens charged for a request before the model's average is known.
    default_output_tokens: float = 256.0
    max_prompt_chars: int = 1_000_000
    allowed_models: frozenset[str] = frozenset()
    #: Fallback policy of requests that name none (and whose tenant and model set none).
    default_fallback: int = 1
    #: deterministic: share identical greedy/seeded requests; always; off.
    dedup: str = "deterministic"
    reap_interval_seconds: float = 0.25
    #: The Pool's gRPC address; empty = this replica only queues (no dispatching).
    pool_address: str = ""
    #: The token this replica presents to the Pool (a principal with the "service" role).
    service_token: str = ""
    #: Requests this replica runs at once.
    dispatch_concurrency: int = 16
    #: Limits of every tenant without its own (SetTenantLimits); 0 = unlimited.
    tenant_limits: Limits = field(default_factory=Limits)
    #: Bytes one tenant may keep in Redis: queued requests and finished ones kept for the
    #: result TTL; 0 = unbounded.
    tenant_max_stored_bytes: int = 256 * 1024 * 1024
    #: Port of the Prometheus /metrics endpoint; 0 = off.
    metrics_port: int = 0
    #: On SIGTERM, how long in-flight calls may take before they are cut off.
    shutdown_grace_seconds: float = 10.0
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SchedulerSettings:
        d = cls()
        redis_url = env_str("USHER_REDIS_URL", env_str("REDIS_URL", d.redis_url, env), env)
        settings = cls(
            redis_url=redis_url,
            redis_wait_replicas=env_int("USHER_REDIS_WAIT_REPLICAS", d.redis_wait_replicas, env),
            redis_wait_timeout_ms=env_int(
                "USHER_REDIS_WAIT_TIMEOUT_MS", d.redis_wait_timeout_ms, env
            ),
            listen=env_str("USHER_SCHEDULER_LISTEN", d.listen, env),
            tokens=load_token_map(env),
            max_queue_size=env_int("USHER_QUEUE_MAX_SIZE", d.max_queue_size, env),
            queue_timeout_seconds=env_float(
                "USHER_QUEUE_TIMEOUT_SECONDS", d.queue_timeout_seconds, env
            ),
            max_attempts=env_int("USHER_MAX_ATTEMPTS", d.max_attempts, env),
            retry_backoff_seconds=env_float(
                "USHER_RETRY_BACKOFF_SECONDS", d.retry_backoff_seconds, env
            ),
            retry_backoff_max_seconds=env_float(
                "USHER_RETRY_BACKOFF_MAX_SECONDS", d.retry_backoff_max_seconds, env
            ),
            lease_seconds=env_float("USHER_LEASE_SECONDS", d.lease_seconds, env),
            parallel=env_int("USHER_DEFAULT_PARALLEL", d.parallel, env),
            result_ttl_seconds=env_int("USHER_RESULT_TTL_SECONDS", d.result_ttl_seconds, env),
            idempotency_ttl_seconds=env_int(
                "USHER_IDEMPOTENCY_TTL_SECONDS", d.idempotency_ttl_seconds, env
            ),
            priority_lead=env_float("USHER_PRIORITY_LEAD_TOKENS", d.priority_lead, env),
            default_output_tokens=env_float(
                "USHER_DEFAULT_OUTPUT_TOKENS", d.default_output_tokens, env
            ),
            max_prompt_chars=env_int("USHER_MAX_PROMPT_CHARS", d.max_prompt_chars, env),
            allowed_models=frozenset(env_list("USHER_ALLOWED_MODELS", [], env)),
            dedup=env_str("USHER_DEDUP", d.dedup, env),
            default_fallback=_fallback_policy(env),
            reap_interval_seconds=env_float(
                "USHER_REAP_INTERVAL_SECONDS", d.reap_interval_seconds, env
            ),
            pool_address=env_str("USHER_POOL_ADDRESS", d.pool_address, env),
            service_token=env_str("USHER_SERVICE_TOKEN", d.service_token, env),
            dispatch_concurrency=env_int("USHER_DISPATCH_CONCURRENCY", d.dispatch_concurrency, env),
            tenant_limits=Limits(
                requests_per_minute=env_int("USHER_TENANT_REQUESTS_PER_MINUTE", 0, env),
                tokens_per_minute=env_int("USHER_TENANT_TOKENS_PER_MINUTE", 0, env),
                max_concurrent=env_int("USHER_TENANT_MAX_CONCURRENT", 0, env),
            ),
            tenant_max_stored_bytes=env_int(
                "USHER_TENANT_MAX_STORED_BYTES", d.tenant_max_stored_bytes, env
            ),
            metrics_port=env_int("USHER_METRICS_PORT", d.metrics_port, env),
            shutdown_grace_seconds=env_float(
                "USHER_SHUTDOWN_GRACE_SECONDS", d.shutdown_grace_seconds, env
            ),
            log_level=env_str("USHER_LOG_LEVEL", d.log_level, env),
        )
        settings.check()
        return settings

    def check(self) -> None:
        problems = []
        if self.max_queue_size < 1:
            problems.append("USHER_QUEUE_MAX_SIZE must be at least 1")
        if self.queue_timeout_seconds <= 0:
            problems.append("USHER_QUEUE_TIMEOUT_SECONDS must be positive")
        if self.redis_wait_replicas < 0:
            problems.append("USHER_REDIS_WAIT_REPLICAS must not be negative")
        if self.redis_wait_timeout_ms < 1:
            problems.append("USHER_REDIS_WAIT_TIMEOUT_MS must be at least 1")
        if self.max_attempts < 1:
            problems.append("USHER_MAX_ATTEMPTS must be at least 1")
        if self.retry_backoff_seconds < 0 or self.retry_backoff_max_seconds < 0:
            problems.append("USHER_RETRY_BACKOFF_SECONDS and _MAX_SECONDS must not be negative")
        if self.lease_seconds <= 0:
            problems.append("USHER_LEASE_SECONDS must be positive")
        if self.dedup not in DEDUP_MODES:
            problems.append(f"USHER_DEDUP must be one of {', '.join(DEDUP_MODES)}")
        if self.pool_address and not self.service_token:
            problems.append("USHER_SERVICE_TOKEN is needed to call the pool at USHER_POOL_ADDRESS")
        if self.tenant_max_stored_bytes < 0:
            problems.append("USHER_TENANT_MAX_STORED_BYTES must not be negative")
        if self.max_prompt_chars >= self.tenant_max_stored_bytes > 0:
            problems.append(
                "USHER_TENANT_MAX_STORED_BYTES must exceed USHER_MAX_PROMPT_CHARS, "
                "or no request of the largest size could be queued"
            )
        if self.dispatch_concurrency < 1:
            problems.append("USHER_DISPATCH_CONCURRENCY must be at least 1")
        if problems:
            raise ConfigError("; ".join(problems))
