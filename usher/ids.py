"""Ids: requests are ULIDs (time-ordered, 26 Crockford base32 characters, URL-safe) whose
last characters are a tag of their model's name, so a request is found by its id alone
without an index entry per request; events are Redis stream entry ids ("1700000000000-3"),
which resume a watch."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import threading
import time

__all__ = [
    "MODEL_TAG_CHARS",
    "REQUEST_ID_METADATA",
    "event_id_key",
    "is_event_id",
    "is_request_id",
    "model_tag",
    "new_request_id",
    "tag_of",
]

#: The gRPC metadata key a Submit that waits for its result (``await_result``) sends the
#: request's id under first, before its answer.
REQUEST_ID_METADATA = "x-usher-request-id"
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PATTERN = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
_EVENT_ID = re.compile(r"(\d{1,15})-(\d{1,15})")


#: Characters at the end of a request id that tag its model (20 bits): ids of requests of
#: different models share a tag about once in a million pairs (a lookup asks each).
MODEL_TAG_CHARS = 4
_TAG_BITS = 5 * MODEL_TAG_CHARS


def _base32(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


@functools.lru_cache(maxsize=1024)  # per Submit: a fleet has a handful of model names
def _tag_value(model: str) -> int:
    digest = hashlib.blake2b(model.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> (32 - _TAG_BITS)


def model_tag(model: str) -> str:
    """The characters a request id of ``model`` ends with."""
    return _base32(_tag_value(model), MODEL_TAG_CHARS)


def tag_of(request_id: str) -> str:
    return request_id[-MODEL_TAG_CHARS:]


class _Ascending:
    """The last id's value made from the clock in this process, so the next one is larger:
    ids made within one millisecond sort in the order they were made (a listing "newest
    first" keeps it), as ULID's monotonic mode. The step above the tag's bits is random, so
    an id still does not tell the next one."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def after_last(self, value: int) -> int:
        with self._lock:
            if value <= self._last:  # the same millisecond, or the clock stepped back
                step = 1 + int.from_bytes(os.urandom(4), "big")
                value = self._last + (step << _TAG_BITS)
            self._last = value
            return value


_ascending = _Ascending()


def new_request_id(now_ms: int | None = None, model: str | None = None) -> str:
    """A new ULID: 48 bits of milliseconds then 80 random bits, of which the last 20 are
    ``model``'s tag when given (60 random bits stay: unique enough within a millisecond).
    Made from the clock (no ``now_ms``), each is larger than the last one made here."""
    random = int.from_bytes(os.urandom(10), "big")
    if now_ms is None:
        value = _ascending.after_last((int(time.time() * 1000) << 80) | random)
    else:
        value = (now_ms << 80) | random
    if model is not None:
        value = (value >> _TAG_BITS << _TAG_BITS) | _tag_value(model)
    return _base32(value, 26)


def is_request_id(text: str) -> bool:
    return bool(_PATTERN.fullmatch(text))


def is_event_id(text: str) -> bool:
    return _EVENT_ID.fullmatch(text) is not None


def event_id_key(text: str) -> tuple[int, int] | None:
    """Event ids in order ("ms-seq" compared as numbers); None for anything else."""
    found = _EVENT_ID.fullmatch(text)
    return (int(found[1]), int(found[2])) if found else None
