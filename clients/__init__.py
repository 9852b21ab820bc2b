"""Python SDK and CLI for Usher.

```python
from clients import AsyncUsherClient, UsherClient

with UsherClient(token="alice-token") as usher:  # addresses from USHER_*_ADDRESS
    request = usher.submit_and_wait("llama3.2:1b", "Why is the sky blue?")
    print(request.text)
```

The ``usher`` command (``clients.cli``) is built on the same client.
"""

from clients.aio import AsyncAdmin, AsyncUsherClient, SubmitOptions, TokenStream
from clients.errors import (
    Aborted,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    OutputRestarted,
    PermissionDenied,
    RequestFailed,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
    UsherError,
)
from clients.retry import RetryEvent, RetryPolicy
from clients.sync import Admin, SyncTokenStream, UsherClient
from clients.types import (
    Badge,
    Eta,
    FallbackPolicy,
    Priority,
    QueueLevel,
    Request,
    RequestKind,
    RequestState,
    Result,
    Route,
    Submission,
    Update,
    UpdateKind,
    Usage,
)

__all__ = [
    "Aborted",
    "Admin",
    "AsyncAdmin",
    "AsyncUsherClient",
    "Badge",
    "Cancelled",
    "DeadlineExceeded",
    "Eta",
    "FailedPrecondition",
    "FallbackPolicy",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "OutputRestarted",
    "PermissionDenied",
    "Priority",
    "QueueLevel",
    "Request",
    "RequestFailed",
    "RequestKind",
    "RequestState",
    "ResourceExhausted",
    "Result",
    "RetryEvent",
    "RetryPolicy",
    "Route",
    "ServerError",
    "Submission",
    "SubmitOptions",
    "SyncTokenStream",
    "TokenStream",
    "Unauthenticated",
    "Unavailable",
    "Update",
    "UpdateKind",
    "Usage",
    "UsherClient",
    "UsherError",
]
