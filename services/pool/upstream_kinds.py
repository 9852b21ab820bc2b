"""The model-server kinds the Pool speaks, and the adapter for each: ``make_upstream``.

Apart from the base module (``upstream``), which both kinds build on, so that neither
imports the other nor the base imports them.
"""

from __future__ import annotations

from typing import Any

from services.pool.upstream import Upstream
from services.pool.upstream_ollama import OllamaUpstream
from services.pool.upstream_openai import OpenAIUpstream

__all__ = ["make_upstream"]


def make_upstream(
    kind: str,
    base_url: str,
    *,
    api_key: str | None = None,
    connect_timeout: float = 2.0,
    read_timeout: float = 300.0,
    max_connections: int = 256,
    standard_only: bool = False,
) -> Upstream:
    """An adapter for ``kind`` ``"ollama"`` or ``"openai"`` at ``base_url``.

    ``api_key`` is sent as ``Authorization: Bearer``. ``standard_only`` (OpenAI
    kind) sends only fields of OpenAI's own API, dropping ``top_k`` and the
    ``extra`` options that local servers accept but strict providers reject.
    """
    normalized = kind.strip().lower()
    common: dict[str, Any] = {
        "api_key": api_key,
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_connections": max_connections,
    }
    if normalized == "ollama":
        return OllamaUpstream(base_url, **common)
    if normalized == "openai":
        return OpenAIUpstream(base_url, standard_only=standard_only, **common)
    raise ValueError(f"unknown upstream kind {kind!r} (expected 'ollama' or 'openai')")
