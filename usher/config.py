"""The error of a bad setting, shared by every settings reader (usher/settings.py holds
the readers: pydantic-settings models, one per service and per shared concern)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable."""
