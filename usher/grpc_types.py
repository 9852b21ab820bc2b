"""Type aliases for grpc.aio code.

The grpcio stubs make ``grpc.aio.ServicerContext`` and ``grpc.RpcMethodHandler`` generic;
the runtime classes are not subscriptable, so the aliases are strings for type checkers only.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc
import grpc.aio

__all__ = ["Context", "MethodHandler"]

#: The context of a grpc.aio servicer method (any request and response type).
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
#: A method handler as interceptors receive and return it.
MethodHandler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
