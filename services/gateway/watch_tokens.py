"""Short-lived signed watch tokens (pure): what lets a browser's EventSource or WebSocket,
which cannot send an ``Authorization`` header, watch one request (or the queue badges)
without putting a long-lived credential in a URL.

A token names its scope (one request id, or the queue badges), the tenant it was issued
to and its expiry, and carries an HMAC-SHA256 over all three with the gateway's watch
secret. The gateway issues one only to a caller the Scheduler has just accepted as the
request's owner (a Submit, or a Get with the caller's own credential); holding it lets
the gateway watch that request with its own service identity, nothing more: a token for
one request does not open another, nor cancel or switch anything.

Format: ``base64url(JSON payload) "." base64url(signature)``, no padding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass

__all__ = [
    "QUEUES_SCOPE",
    "InvalidWatchToken",
    "WatchClaims",
    "WatchTokens",
    "derive_secret",
    "request_scope",
]

#: The scope of a token that opens the queue badge streams.
QUEUES_SCOPE = "queues"
_REQUEST_PREFIX = "request:"


def derive_secret(credential: str) -> bytes:
    """A watch secret from the gateway's own service credential, which every replica shares:
    one-way (the secret does not reveal the credential), and whoever holds the credential
    could watch any request anyway."""
    return hmac.new(credential.encode(), b"usher watch tokens v1", hashlib.sha256).digest()


def request_scope(request_id: str) -> str:
    return _REQUEST_PREFIX + request_id


class InvalidWatchToken(Exception):
    """The token is malformed, forged, expired or for another scope (the reason says which;
    it is safe to show: it never contains the token)."""


@dataclass(frozen=True, slots=True)
class WatchClaims:
    scope: str
    tenant: str
    expires_at: float


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WatchTokens:
    """Issues and verifies watch tokens with one secret (shared by every gateway replica)."""

    def __init__(self, secret: bytes, ttl_seconds: float) -> None:
        if len(secret) < 16:
            raise ValueError("the watch secret needs at least 16 bytes")
        if ttl_seconds <= 0:
            raise ValueError("the watch token lifetime must be positive")
        self._secret = secret
        self.ttl_seconds = ttl_seconds

    def _sign(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()

    def issue(self, scope: str, tenant: str, now: float) -> tuple[str, WatchClaims]:
        claims = WatchClaims(scope, tenant, round(now + self.ttl_seconds, 3))
        payload = json.dumps(
            {"s": claims.scope, "t": claims.tenant, "e": claims.expires_at},
            separators=(",", ":"),
        ).encode()
        return f"{_b64encode(payload)}.{_b64encode(self._sign(payload))}", claims

    def verify(self, token: str, scope: str, now: float) -> WatchClaims:
        """The token's claims, when it is ours, unexpired and for ``scope``."""
        encoded, dot, signature = token.partition(".")
        if not dot or not encoded or not signature or len(token) > 4096:
            raise InvalidWatchToken("malformed watch token")
        try:
            payload = _b64decode(encoded)
            given = _b64decode(signature)
        except (binascii.Error, ValueError):
            raise InvalidWatchToken("malformed watch token") from None
        if _b64encode(payload) != encoded or _b64encode(given) != signature:
            # One spelling per token: no second string decodes to the same bytes.
            raise InvalidWatchToken("malformed watch token")
        if not hmac.compare_digest(given, self._sign(payload)):
            raise InvalidWatchToken("watch token signature does not match")
        try:
            body = json.loads(payload)
            claims = WatchClaims(str(body["s"]), str(body["t"]), float(body["e"]))
        except (ValueError, KeyError, TypeError):
            raise InvalidWatchToken("malformed watch token") from None
        if claims.expires_at <= now:
            raise InvalidWatchToken("watch token expired")
        if not hmac.compare_digest(claims.scope.encode(), scope.encode()):
            raise InvalidWatchToken("watch token is for another request")
        return claims
