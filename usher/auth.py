"""Who is calling: bearer tokens in gRPC metadata → a principal (user, organization, roles).

For now a static token map (``USHER_API_TOKENS="token=user@org[:role+role],..."``). The
tenant of every request comes from here, never from a request body.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from usher.config import ConfigError
from usher.errors import PermissionDenied, Unauthenticated

__all__ = ["ADMIN_ROLE", "Principal", "StaticTokenAuthenticator", "parse_token_map"]

ADMIN_ROLE = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    organization: str
    roles: frozenset[str] = field(default_factory=frozenset)

    @property
    def tenant(self) -> str:
        """The "org/user" key that owns requests and fairness flows."""
        return f"{self.organization}/{self.user}"

    @property
    def is_admin(self) -> bool:
        return ADMIN_ROLE in self.roles

    def require_admin(self) -> None:
        if not self.is_admin:
            raise PermissionDenied("this method needs the admin role")


def parse_token_map(spec: str) -> dict[str, Principal]:
    """Parse ``token=user@org[:role+role]`` entries separated by commas."""
    tokens: dict[str, Principal] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        token, sep, identity = entry.partition("=")
        who, _, roles = identity.partition(":")
        user, at, org = who.partition("@")
        if not sep or not at or not token or not user or not org:
            raise ConfigError(
                f"USHER_API_TOKENS entry {token[:4]}...: expected token=user@org[:roles]"
            )
        tokens[token] = Principal(user, org, frozenset(r for r in roles.split("+") if r))
    return tokens


class StaticTokenAuthenticator:
    """Maps ``authorization: Bearer <token>`` metadata to a principal."""

    def __init__(self, tokens: Mapping[str, Principal]) -> None:
        self._tokens = dict(tokens)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        header = _bearer(metadata or ())
        if header is None:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        for token, principal in self._tokens.items():
            if hmac.compare_digest(token.encode(), header.encode()):
                return principal
        raise Unauthenticated("unknown token")


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | Sequence[tuple[str, str]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return None
