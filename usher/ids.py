"""Request ids: ULIDs (time-ordered, 26 Crockford base32 characters, URL-safe)."""

from __future__ import annotations

import os
import re
import time

__all__ = ["is_request_id", "new_request_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


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
