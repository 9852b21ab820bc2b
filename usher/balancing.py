"""Client-side load balancing for every gRPC channel: an address names all replicas of a
service, and calls go round robin over them.

An address is one of:

- ``dns:///name:port`` (or any other gRPC target with a scheme, e.g. ``ipv4:``): gRPC's own
  resolver; with a Kubernetes headless Service the name resolves to every ready pod, and it
  is resolved again whenever a connection ends (servers cap connection age for that).
- ``host:port,host:port…``: these replicas (names resolved once, when the channel opens).
- ``host:port``: every address the name resolves to.

Calls are spread per call (gRPC ``round_robin``), not per connection, so a gateway or a
Scheduler with one channel uses every replica behind it.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "ROUND_ROBIN",
    "balanced_target",
    "channel_target",
    "split_addresses",
]

#: gRPC service config that balances each call over every resolved address.
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

Resolver = Callable[[str, int], Sequence[str]]


def split_addresses(address: str) -> list[tuple[str, int]]:
    """``host:port[,host:port…]`` as (host, port) pairs; ValueError naming a bad item."""
    pairs = []
    for item in address.split(","):
        host, sep, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item.strip()!r} in {address!r} is not host:port")
        pairs.append((host, int(port)))
    return pairs


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def balanced_target(address: str, resolve: Resolver) -> tuple[str, str]:
    """The gRPC target for ``address`` and the authority its calls carry (the first host,
    so TLS checks the name the operator wrote). A comma list becomes an ``ipv4:``/``ipv6:``
    target of every replica's addresses (``resolve`` turns a name into IP literals)."""
    if "," not in address:
        return address, ""
    pairs = split_addresses(address)
    ips: list[str] = []
    for host, port in pairs:
        for ip in [host] if _literal(host) else resolve(host, port):
            literal = _literal(ip)
            if literal is None:
                raise ValueError(f"{ip!r} resolved from {host!r} is not an IP address")
            ips.append(f"[{ip}]:{port}" if literal.version == 6 else f"{ip}:{port}")
    if not ips:
        raise ValueError(f"no address for {address!r}")
    # gRPC's ipv4:/ipv6: targets take one family: keep the one most replicas have.
    v6 = [ip for ip in ips if ip.startswith("[")]
    v4 = [ip for ip in ips if not ip.startswith("[")]
    target = f"ipv4:{','.join(v4)}" if len(v4) >= len(v6) else f"ipv6:{','.join(v6)}"
    host, port = pairs[0]
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return target, authority


def _resolve(host: str, port: int) -> list[str]:
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def channel_target(address: str) -> tuple[str, list[tuple[str, Any]]]:
    """The target and channel options that balance calls over every replica at
    ``address`` (see the module's docstring)."""
    target, authority = balanced_target(address, _resolve)
    options: list[tuple[str, Any]] = [("grpc.service_config", ROUND_ROBIN)]
    if authority:
        options.append(("grpc.default_authority", authority))
    return target, options
