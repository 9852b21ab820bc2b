"""Duration, size and timestamp helpers that mirror Ollama's (Go) wire formats.

Ollama parses ``keep_alive`` with Go's ``time.ParseDuration`` (strings) or as a
number of seconds, prints timestamps as RFC 3339 with nanoseconds, and reports
memory with ``format.HumanBytes2``. Everything here is pure and synchronous so
it can be unit-tested without a server.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

__all__ = [
    "FOREVER",
    "MAX_DURATION_NS",
    "DurationError",
    "expires_at",
    "format_rfc3339",
    "human_bytes2",
    "parse_go_duration",
    "parse_keep_alive",
    "parse_keep_alive_setting",
    "parse_size",
    "utcnow",
]

#: Go's ``math.MaxInt64`` nanoseconds: what Ollama stores for "keep forever".
MAX_DURATION_NS = 2**63 - 1
#: Keep-alive value (seconds) meaning "never unload".
FOREVER = math.inf

# Units accepted by Go's time.ParseDuration, in nanoseconds.
_GO_UNITS: dict[str, float] = {
    "ns": 1.0,
    "us": 1e3,
    "\u00b5s": 1e3,  # micro sign
    "\u03bcs": 1e3,  # greek mu
    "ms": 1e6,
    "s": 1e9,
    "m": 60e9,
    "h": 3600e9,
}
_NUMBER = re.compile(r"[0-9]*(\.[0-9]*)?")


class DurationError(ValueError):
    """A duration that Go's ``time.ParseDuration`` would reject (same message)."""


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_go_duration(text: str) -> int:
    """Parse a Go duration string ("5m", "1h30m", "-1s", "0") into nanoseconds.

    Error messages match Go's so a 400 body reads like real Ollama's; note that Go
    rejects a bare number such as ``"-1"`` ("missing unit"), and so do we.
    """
    orig = text
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"time: invalid duration {_quote(orig)}")
    total = 0.0
    while s:
        if not (s[0] == "." or s[0].isdigit()):
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        match = _NUMBER.match(s)
        assert match is not None  # the pattern matches the empty string
        number = match.group(0)
        if number in ("", "."):
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        s = s[len(number) :]
        i = 0
        while i < len(s) and not (s[i] == "." or s[i].isdigit()):
            i += 1
        if i == 0:
            raise DurationError(f"time: missing unit in duration {_quote(orig)}")
        unit = s[:i]
        s = s[i:]
        if unit not in _GO_UNITS:
            raise DurationError(f"time: unknown unit {_quote(unit)} in duration {_quote(orig)}")
        total += float(number) * _GO_UNITS[unit]
    if total > MAX_DURATION_NS:
        raise DurationError(f"time: invalid duration {_quote(orig)}")
    ns = int(total)
    return -ns if neg else ns


def _go_type_name(value: object) -> str:
    # reflect.TypeOf of what encoding/json decodes into an `any`.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return type(value).__name__


def parse_keep_alive(value: object) -> float | None:
    """Decode a request's ``keep_alive`` into seconds (``FOREVER`` for negative).

    ``None`` (absent / JSON null) means "not specified": a loaded model keeps its
    current keep-alive, a new load uses the server default. Numbers are seconds,
    strings are Go durations; anything negative means forever, as in Ollama's
    ``api.Duration.UnmarshalJSON``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DurationError(f"Unsupported type: '{_go_type_name(value)}'")
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return FOREVER if ns < 0 else ns / 1e9
    seconds = float(value)
    if math.isnan(seconds):
        raise DurationError("Unsupported type: 'float64'")
    return FOREVER if seconds < 0 else seconds


def parse_keep_alive_setting(value: str | float) -> float:
    """Parse a server-side default (``OLLAMA_KEEP_ALIVE`` style).

    Unlike the request field, the environment variable also accepts a bare
    integer number of seconds, so ``"-1"`` means forever here.
    """
    if isinstance(value, (int, float)):
        return FOREVER if value < 0 else float(value)
    try:
        ns = parse_go_duration(value)
        return FOREVER if ns < 0 else ns / 1e9
    except DurationError:
        seconds = int(value)  # ValueError propagates for garbage
        return FOREVER if seconds < 0 else float(seconds)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: str | int | float) -> int:
    """Parse "4.7GB", "8GiB", "512MiB" or a plain number into bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE.match(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size: {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def human_bytes2(n: int) -> str:
    """Binary-unit rendering used in Ollama's memory error messages."""
    if n >= 1024**3:
        return f"{n / 1024**3:.1f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_rfc3339(dt: datetime) -> str:
    """RFC 3339 with a trimmed fractional part, like Go's ``time.RFC3339Nano``."""
    dt = dt.astimezone(UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if dt.microsecond:
        base += "." + f"{dt.microsecond:06d}".rstrip("0")
    return base + "Z"


def expires_at(now: datetime, keep_alive: float) -> datetime:
    """When a model idle since ``now`` unloads; "forever" is now + MaxInt64 ns like Go."""
    if math.isinf(keep_alive):
        return now + timedelta(microseconds=MAX_DURATION_NS // 1000)
    return now + timedelta(seconds=keep_alive)
