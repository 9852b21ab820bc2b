"""The HTTP-independent core of an emulated instance: resolves models, applies
failure injection, leases slots from the scheduler and produces a paced stream
of generation events that the native and OpenAI-compatible handlers render.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from usher.emulator import textgen
from usher.emulator.config import EmulatorConfig, ModelSpec
from usher.emulator.scheduler import (
    Lease,
    ModelLoadError,
    QueueFullError,
    Scheduler,
    SchedulerClosedError,
)
from usher.emulator.stats import EmulatorStats

__all__ = [
    "ApiError",
    "Crash",
    "Done",
    "Drop",
    "Engine",
    "Event",
    "GenerationJob",
    "Metrics",
    "StreamError",
    "Tokens",
]


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Metrics:
    """Ollama's final-chunk statistics; durations in nanoseconds."""

    total_duration: int = 0
    load_duration: int = 0
    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0


@dataclass(frozen=True)
class Tokens:
    """Tokens ready to send now (one NDJSON line / SSE event each)."""

    texts: list[str]


@dataclass(frozen=True)
class Done:
    done_reason: str
    text: str
    metrics: Metrics


@dataclass(frozen=True)
class StreamError:
    """The run failed; rendered as a final ``{"error": ...}`` line (or a 500)."""

    message: str


@dataclass(frozen=True)
class Drop:
    """Abort the TCP connection without a final line."""


@dataclass(frozen=True)
class Crash:
    """Crash the whole instance."""


Event = Tokens | Done | StreamError | Drop | Crash


@dataclass
class GenerationJob:
    """One generate/chat run after request parsing."""

    spec: ModelSpec
    #: Hash input: same key + seed gives the same text.
    key: str
    prompt_tokens: int
    num_predict: int | None
    seed: int
    #: ``format`` of the request (``"json"`` or a JSON schema) or None.
    format: object = None
    #: ``time.perf_counter()`` when the request arrived (for total/load durations).
    started: float = field(default_factory=time.perf_counter)


def _ns(seconds: float) -> int:
    # Ollama omits zero durations; keep measured ones strictly positive.
    return max(1, int(seconds * 1e9))


class Engine:
    """Scheduler + faults + stats of one instance; shared by all handlers."""

    def __init__(self, config: EmulatorConfig, *, on_crash: Callable[[], None] | None = None):
        self.config = config
        self.stats = EmulatorStats()
        self.scheduler = Scheduler(config, self.stats)
        self._on_crash = on_crash
        self._fault_event = asyncio.Event()
        self.closing = False

    # -- models ---------------------------------------------------------------

    def resolve(self, name: str) -> ModelSpec | None:
        return self.config.find_model(name)

    def default_num_ctx(self, spec: ModelSpec, requested: int | None) -> int:
        return spec.effective_num_ctx(
            requested if requested is not None else self.config.default_num_ctx
        )

    # -- faults ---------------------------------------------------------------

    def faults_changed(self) -> None:
        """Wake requests parked by ``hang`` so they re-check the faults."""
        self._fault_event.set()
        self._fault_event = asyncio.Event()

    async def wait_while(self, predicate: Callable[[], bool]) -> None:
        while predicate() and not self.closing:
            await self._fault_event.wait()

    async def close(self) -> None:
        """Release requests parked by faults and stop the scheduler."""
        self.closing = True
        self.faults_changed()
        await self.scheduler.close()

    async def wait_unhung(self) -> None:
        await self.wait_while(lambda: self.config.faults.hang)

    def take_failure(self) -> ApiError | None:
        """Consume one ``fail_next`` injection, if armed."""
        faults = self.config.faults
        if faults.fail_next > 0:
            faults.fail_next -= 1
            return ApiError(faults.fail_status, faults.fail_message)
        return None

    def crash(self) -> None:
        if self._on_crash is not None:
            self._on_crash()

    # -- scheduling -------------------------------------------------------------

    async def acquire(
        self, spec: ModelSpec, *, num_ctx: int, keep_alive: float | None, slot: bool
    ) -> Lease:
        try:
            return await self.scheduler.acquire(
                spec, num_ctx=num_ctx, keep_alive=keep_alive, slot=slot
            )
        except QueueFullError as exc:
            raise ApiError(503, str(exc)) from None
        except ModelLoadError as exc:
            raise ApiError(500, str(exc)) from None
        except SchedulerClosedError:
            raise ApiError(500, "server shutting down") from None

    def release(self, lease: Lease) -> None:
        self.scheduler.release(lease)

    # -- generation ---------------------------------------------------------------

    def plan_tokens(self, job: GenerationJob) -> tuple[list[str], str]:
        """The tokens this request will produce and its done_reason."""
        cfg = self.config
        if job.format is not None and job.format != "":
            natural = textgen.json_tokens(job.key, job.seed + cfg.seed, job.format)
        else:
            lo, hi = cfg.output_tokens
            n = textgen.natural_length(job.key, job.seed + cfg.seed, lo, hi)
            natural = textgen.text_tokens(job.key, job.seed + cfg.seed, n)
        limit = job.num_predict
        if limit is not None and limit >= 0 and limit < len(natural):
            return natural[:limit], "length"
        return natural, "stop"

    async def generate(self, job: GenerationJob, lease: Lease) -> AsyncGenerator[Event, None]:
        """Paced events for one run; call with a granted slot ``lease``."""
        cfg = self.config
        faults = cfg.faults
        loaded = time.perf_counter()
        if cfg.time_to_first_token > 0:
            await asyncio.sleep(cfg.time_to_first_token)
        first = time.perf_counter()
        tokens, reason = self.plan_tokens(job)
        tps = job.spec.tokens_per_second or cfg.tokens_per_second
        model_stats = self.stats.model(job.spec.name)
        pending: list[str] = []
        for i, token in enumerate(tokens):
            fault = self._fault_after(i)  # faults trigger after exactly i tokens
            if fault is not None:
                if pending:
                    yield Tokens(pending)
                yield fault
                return
            if faults.hang_after_tokens is not None and faults.hang_after_tokens == i:
                if pending:
                    yield Tokens(pending)
                    pending = []
                await self.wait_while(lambda: faults.hang_after_tokens is not None)
            if not cfg.instant:
                # Absolute schedule: token i is due at first + (i+1)/tps, no drift.
                delay = first + (i + 1) / tps - time.perf_counter()
                if delay > 0.001:
                    if pending:
                        yield Tokens(pending)
                        pending = []
                    await asyncio.sleep(delay)
            pending.append(token)
            model_stats.tokens_generated += 1
            self.stats.tokens_generated += 1
        if pending:
            yield Tokens(pending)
        end = time.perf_counter()
        yield Done(
            done_reason=reason,
            text="".join(tokens),
            metrics=Metrics(
                total_duration=_ns(end - job.started),
                load_duration=_ns(loaded - job.started),
                prompt_eval_count=job.prompt_tokens,
                prompt_eval_duration=_ns(first - loaded),
                eval_count=len(tokens),
                eval_duration=_ns(end - first) if tokens else 0,
            ),
        )

    def _fault_after(self, emitted: int) -> Crash | Drop | StreamError | None:
        """The armed fault that ends a run after ``emitted`` tokens, counting it down."""
        faults = self.config.faults
        if faults.crash_after_tokens == emitted:
            return Crash()
        if faults.drop_after_tokens == emitted:
            faults.drop_times = _count_down(faults.drop_times)
            if faults.drop_times == 0:
                faults.drop_after_tokens = faults.drop_times = None
            return Drop()
        if faults.error_after_tokens == emitted:
            message = faults.error_message
            faults.error_times = _count_down(faults.error_times)
            if faults.error_times == 0:
                faults.error_after_tokens = faults.error_times = None
            return StreamError(message)
        return None

    async def embed(
        self, spec: ModelSpec, inputs: list[str], dimensions: int | None
    ) -> tuple[list[list[float]], int]:
        """Vectors and prompt token count; takes one prompt-eval time of work."""
        cfg = self.config
        if cfg.time_to_first_token > 0:
            await asyncio.sleep(cfg.time_to_first_token)
        dim = cfg.embedding_dim_for(spec)
        vectors = []
        for text in inputs:
            vec = textgen.embedding(f"{spec.name}\x1f{text}", dim, cfg.seed)
            if dimensions is not None and 0 < dimensions < len(vec):
                vec = textgen.truncate_embedding(vec, dimensions)
            vectors.append(vec)
        tokens = sum(textgen.count_tokens(t) for t in inputs)
        return vectors, tokens


def _count_down(times: int | None) -> int | None:
    return None if times is None else max(0, times - 1)
