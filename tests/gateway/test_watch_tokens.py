"""Watch tokens: what one signs opens that scope only, until it expires; nothing else
verifies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.watch_tokens import (
    QUEUES_SCOPE,
    InvalidWatchToken,
    WatchTokens,
    derive_secret,
    request_scope,
)

TOKENS = WatchTokens(b"a secret of sixteen+ bytes", ttl_seconds=60)
NOW = 1_700_000_000.0


def test_a_token_opens_its_scope_until_it_expires() -> None:
    token, claims = TOKENS.issue(request_scope("r1"), "acme/alice", NOW)
    assert TOKENS.verify(token, request_scope("r1"), NOW + 59) == claims
    assert claims.tenant == "acme/alice" and claims.expires_at == NOW + 60
    with pytest.raises(InvalidWatchToken, match="expired"):
        TOKENS.verify(token, request_scope("r1"), NOW + 60)
    with pytest.raises(InvalidWatchToken, match="another request"):
        TOKENS.verify(token, request_scope("r2"), NOW)
    with pytest.raises(InvalidWatchToken):
        TOKENS.verify(token, QUEUES_SCOPE, NOW)


def test_another_secret_does_not_verify() -> None:
    token, _ = TOKENS.issue(QUEUES_SCOPE, "", NOW)
    other = WatchTokens(b"another secret, also long", ttl_seconds=60)
    with pytest.raises(InvalidWatchToken, match="signature"):
        other.verify(token, QUEUES_SCOPE, NOW)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        WatchTokens(b"short", 60)
    with pytest.raises(ValueError, match="positive"):
        WatchTokens(b"a secret of sixteen+ bytes", 0)


@given(st.text(max_size=200))
def test_garbage_never_verifies(garbage: str) -> None:
    with pytest.raises(InvalidWatchToken):
        TOKENS.verify(garbage, QUEUES_SCOPE, NOW)


@given(st.integers(min_value=0, max_value=200), st.sampled_from("AQZaz09-_."))
def test_any_changed_character_is_refused(at: int, char: str) -> None:
    token, _ = TOKENS.issue(request_scope("r1"), "acme/alice", NOW)
    at %= len(token)
    changed = token[:at] + char + token[at + 1 :]
    if changed == token:
        return
    with pytest.raises(InvalidWatchToken):
        TOKENS.verify(changed, request_scope("r1"), NOW)


def test_replicas_sharing_a_credential_share_the_derived_secret() -> None:
    one = WatchTokens(derive_secret("service-token"), 60)
    two = WatchTokens(derive_secret("service-token"), 60)
    token, _ = one.issue(QUEUES_SCOPE, "", NOW)
    assert two.verify(token, QUEUES_SCOPE, NOW).scope == QUEUES_SCOPE
    other = WatchTokens(derive_secret("another credential"), 60)
    with pytest.raises(InvalidWatchToken):
        other.verify(token, QUEUES_SCOPE, NOW)
    assert derive_secret("service-token") != b"service-token"
