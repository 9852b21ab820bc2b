"""Domain errors and their gRPC statuses, with google.rpc details (BadRequest, RetryInfo).

Services raise these; ``ErrorMappingInterceptor`` turns them into statuses, so handlers
stay free of status plumbing and every error says which field or limit was at fault.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
import redis.exceptions
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from usher.grpc_types import Context, MethodHandler
from usher.logs import get_logger

__all__ = [
    "AlreadyFinished",
    "DeadlineExceeded",
    "ErrorMappingInterceptor",
    "FailedPrecondition",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "UsherError",
    "status_details",
    "to_error",
]

log = get_logger("usher.errors")


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One field of a request that was refused, e.g. ``generate.prompt``."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


def status_details(
    trailing: Sequence[tuple[str, str | bytes]] | None,
) -> tuple[tuple[FieldViolation, ...], float | None]:
    """What a failed call's trailers say beyond its code (the inverse of ``to_error``'s
    details): the fields at fault (BadRequest) and when to retry (RetryInfo). Malformed
    details are no reason to fail: they read as none."""
    raw = next(
        (v for k, v in trailing or () if k == "grpc-status-details-bin" and isinstance(v, bytes)),
        None,
    )
    if raw is None:
        return (), None
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:
        return (), None
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToMilliseconds() / 1000
    return tuple(violations), retry_after


class UsherError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for detail in self.details():
            status.details.append(detail)
        return cast(grpc.Status, rpc_status.to_status(status))


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidArgument(UsherError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        return [_pack(bad)]


class Unauthenticated(UsherError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(UsherError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(UsherError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(UsherError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyFinished(FailedPrecondition):
    """The request already reached a terminal state."""


class UpstreamFailed(UsherError):
    """A model server failed after output had started: the stream ends with this error."""

    code = grpc.StatusCode.ABORTED


class Unavailable(UsherError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(UsherError):
    """A request ran past its run-time limit (its model server's call was closed)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(UsherError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[any_pb2.Any]:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, round(self.retry_after_seconds * 1000)))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


class Internal(UsherError):
    """A fault of ours: the caller learns only that, the log has the details."""

    code = grpc.StatusCode.INTERNAL


#: How long a caller should wait when Redis refuses writes for lack of memory.
STORE_FULL_RETRY_SECONDS = 30.0


def _is_out_of_memory(exc: redis.exceptions.RedisError) -> bool:
    # A script's write refused under maxmemory arrives as a ResponseError whose text
    # starts with Redis's "OOM" code, whichever client class it was mapped to.
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).lstrip("-").startswith(
        "OOM"
    )


def _is_refused_access(exc: redis.exceptions.RedisError) -> bool:
    # A wrong password, or an ACL user without a command, key or channel (NOPERM; inside a
    # script it arrives as a plain ResponseError): retrying cannot help, an operator must.
    refused = (
        redis.exceptions.NoPermissionError,
        redis.exceptions.AuthenticationError,
        redis.exceptions.AuthorizationError,
    )
    return isinstance(exc, refused) or str(exc).lstrip("-").startswith("NOPERM")


def to_error(exc: Exception) -> UsherError | None:
    """The documented status of ``exc``, worded for callers (never Redis's own text, which
    may quote commands and keys); None for exceptions that are not ours to map."""
    if isinstance(exc, UsherError):
        return exc
    if not isinstance(exc, redis.exceptions.RedisError):
        return None
    if _is_out_of_memory(exc):
        return ResourceExhausted(
            "the queue store is out of memory and takes no new work; retry later",
            retry_after_seconds=STORE_FULL_RETRY_SECONDS,
        )
    if isinstance(exc, redis.exceptions.BusyLoadingError):
        return Unavailable("the queue store is loading its data; retry shortly")
    if _is_refused_access(exc):
        log.error("redis_access_refused", error_type=type(exc).__name__, error=str(exc)[:300])
        return Internal(
            "the queue store refused Usher's Redis user (password or ACL permissions); "
            "an operator must fix it (logged)"
        )
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return Unavailable("the queue store is unreachable; retry shortly")
    # Read-only replicas during a failover, cluster redirections, a script or command
    # failing: the store cannot do it now.
    log.warning("redis_error", error_type=type(exc).__name__, error=str(exc)[:300])
    return Unavailable("the queue store could not complete the operation; retry shortly")


def _to_status_error(exc: Exception) -> UsherError | None:
    """Every exception a handler lets out becomes a documented status: ours, Redis's, or
    INTERNAL without internal text (logged here). None for gRPC's own (abort, cancel)."""
    if isinstance(exc, grpc.aio.AbortError | grpc.RpcError):
        return None
    error = to_error(exc)
    if error is not None:
        return error
    log.error("unhandled_error", error_type=type(exc).__name__, error=str(exc)[:300])
    return Internal("internal error; it has been logged")


# grpc.aio handlers are coroutines (or async generators), though the stubs type
# RpcMethodHandler's attributes for sync grpc.
Handler: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
StreamHandler: TypeAlias = "Callable[[Any, Context], AsyncIterator[Any]]"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns UsherError (and Redis outages) raised by unary handlers into gRPC statuses."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[MethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> MethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            inner = cast("Handler", handler.unary_unary)

            async def unary(request: Any, context: Context) -> Any:
                try:
                    return await inner(request, context)
                except Exception as exc:
                    error = _to_status_error(exc)
                    if error is None:
                        raise
                    await context.abort_with_status(error.to_status())

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = cast("StreamHandler", handler.unary_stream)

            async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except Exception as exc:
                    error = _to_status_error(exc)
                    if error is None:
                        raise
                    await context.abort_with_status(error.to_status())

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
