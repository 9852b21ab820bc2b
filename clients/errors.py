"""Typed errors of the Usher SDK.

Every failed RPC surfaces as a subclass of :class:`UsherError` that carries the gRPC status
code, the server's message and the google.rpc details the services attach: the fields at
fault (``BadRequest``) and how long to wait before retrying (``RetryInfo``). A request that
ended without a result (failed, expired, cancelled) raises :class:`RequestFailed`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import grpc

from usher.errors import FieldViolation, status_details

if TYPE_CHECKING:
    from clients.types import Request

__all__ = [
    "Aborted",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OutputRestarted",
    "PermissionDenied",
    "RequestFailed",
    "ResourceExhausted",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "UsherError",
    "error_from_rpc",
]


class UsherError(Exception):
    """Base of every SDK error. ``code`` is the gRPC status (None for client-side errors)."""

    default_code: ClassVar[grpc.StatusCode | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.field_violations = field_violations
        #: Seconds the server asked to wait before retrying (google.rpc.RetryInfo).
        self.retry_after = retry_after

    @property
    def fields(self) -> tuple[str, ...]:
        """Names of the fields at fault (empty unless the server named some)."""
        return tuple(v.field for v in self.field_violations)

    def describe(self) -> str:
        """One line for people: the message plus when to retry, when the server said."""
        text = self.message
        if self.retry_after is not None:
            text = text.removesuffix("; retry later").removesuffix(", retry later")
            text = f"{text}; retry in {max(1, math.ceil(self.retry_after))}s"
        return text

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else type(self).__name__
        return f"{name}: {self.describe()}"


class InvalidArgument(UsherError):
    """Bad input; ``field_violations`` names the fields."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(UsherError):
    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(UsherError):
    """Another tenant's request, or an admin method without the admin role."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(UsherError):
    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(UsherError):
    """E.g. cancelling a finished request, switching a request that is no longer queued."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(UsherError):
    """The model's queue is full or a rate limit was hit; see ``retry_after``."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(UsherError):
    """The service could not be reached (or is draining) and retries ran out."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(UsherError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(UsherError):
    default_code = grpc.StatusCode.CANCELLED


class Aborted(UsherError):
    default_code = grpc.StatusCode.ABORTED


class ServerError(UsherError):
    """INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS and other unexpected statuses."""

    default_code = grpc.StatusCode.INTERNAL


class RequestFailed(UsherError):
    """The request ended FAILED, EXPIRED or CANCELLED instead of COMPLETED."""

    def __init__(self, request: Request) -> None:
        state = request.state.name.lower()
        detail = f": {request.error}" if request.error else ""
        super().__init__(f"request {request.id} {state}{detail}")
        self.request = request


class OutputRestarted(UsherError):
    """Output already streamed is void: the request went back to the queue (its model
    server failed mid-answer) and will run again from the start."""

    def __init__(self, request_id: str, last_event_id: str) -> None:
        super().__init__(f"request {request_id} restarted; the output streamed so far is void")
        self.request_id = request_id
        self.last_event_id = last_event_id


_BY_CODE: dict[grpc.StatusCode, type[UsherError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.ABORTED: Aborted,
}


def error_from_rpc(error: grpc.RpcError) -> UsherError:
    """The typed error for a failed RPC (``grpc.aio.AioRpcError`` or a sync ``grpc.Call``)."""
    code_of = getattr(error, "code", None)
    details_of = getattr(error, "details", None)
    code: grpc.StatusCode = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    message = str(details_of() if callable(details_of) else "") or code.name.lower()
    trailing_of = getattr(error, "trailing_metadata", None)
    violations, retry_after = status_details(trailing_of() if callable(trailing_of) else None)
    cls = _BY_CODE.get(code, ServerError)
    return cls(message, code=code, field_violations=violations, retry_after=retry_after)
