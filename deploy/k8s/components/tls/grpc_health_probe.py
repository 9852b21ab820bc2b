"""grpc.health.v1 probe that speaks TLS, for Kubernetes exec probes.

Kubernetes' built-in gRPC probe connects in plaintext, so it cannot check a server that
USHER_TLS_CERT turned to TLS. This script can: it reads the same USHER_TLS_* variables as
the services (the container's own environment), so it also presents the client
certificate when mutual TLS is on.

    python /etc/usher/probe/grpc_health_probe.py PORT SERVER_NAME [SERVICE]

PORT is the local gRPC port; SERVER_NAME a DNS name in the server's certificate (the
Service name, e.g. usher-scheduler), used to verify it while connecting to 127.0.0.1;
SERVICE the health service name ("" = the whole server). Exit 0 when SERVING.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(variable: str) -> bytes | None:
    path = os.environ.get(variable, "")
    return Path(path).read_bytes() if path else None


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    port, server_name = argv[1], argv[2]
    service = argv[3] if len(argv) > 3 else ""
    target = f"127.0.0.1:{port}"
    ca = _read("USHER_TLS_CA")
    if ca is None:
        channel = grpc.insecure_channel(target)
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=_read("USHER_TLS_CLIENT_KEY"),
            certificate_chain=_read("USHER_TLS_CLIENT_CERT"),
        )
        channel = grpc.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", server_name)]
        )
    timeout = float(os.environ.get("USHER_PROBE_TIMEOUT_SECONDS", "2"))
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        print(f"health check of {target} failed: {exc.code().name}: {exc.details()}")
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"{target} is {status}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
