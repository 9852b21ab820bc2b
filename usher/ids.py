"""Ids: requests are ULIDs (time-ordered, 26 Crockford base32 characters, URL-safe); events
are Redis stream entry ids ("1700000000000-3"), which resume a watch."""

from __future__ import annotations

import os
import re
import time

__all__ = ["event_id_key", "is_event_id", "is_request_id", "new_request_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_EVENT_ID = re.compile(r"(\d{1,15})-(\d{1,15})")


def new_request_id(now_ms: int | None = None) -> str:
    """A new ULID: 48 bits of milliseconds then 80 random bits."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def is_request_id(text: str) -> bool:
    return bool(_PATTERN.fullmatch(text))


def is_event_id(text: str) -> bool:
    return _EVENT_ID.fullmatch(text) is not None


def event_id_key(text: str) -> tuple[int, int] | None:
    """Event ids in order ("ms-seq" compared as numbers); None for anything else."""
    found = _EVENT_ID.fullmatch(text)
    return (int(found[1]), int(found[2])) if found else None
