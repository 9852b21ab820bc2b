"""What answers at a model server's address: Ollama's API, or an OpenAI-compatible one
(llama.cpp's server, vLLM, LM Studio, llamafile, ...), and which models it offers.

``make up`` asks this of every instance whose kind the user didn't give, and says what it
found. Ollama also serves ``/v1/models``, so its own ``/api/tags`` is asked first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

__all__ = ["Detection", "auto_parallel", "classify", "probe", "probe_all"]

Kind = Literal["ollama", "openai"]

#: What ``probe`` asks, in order, and what each answer would mean.
TRIED = "GET /api/tags (Ollama) and GET /v1/models (OpenAI-compatible)"

#: ``owned_by`` values that name the server behind an OpenAI-compatible API.
_SERVERS = {
    "llamacpp": "llama.cpp server",
    "me": "llama-cpp-python server",
    "vllm": "vLLM",
    "organization_owner": "LM Studio",
    "llamafile": "llamafile",
    "sglang": "SGLang",
}


@dataclass(frozen=True, slots=True)
class Detection:
    url: str
    #: None when nothing usable answered.
    kind: Kind | None
    models: tuple[str, ...] = ()
    #: What answered, in words ("Ollama 0.12.0", "vLLM", "an OpenAI-compatible server").
    server: str = ""
    #: Why nothing usable answered (connection error, status), when kind is None.
    error: str = ""

    def describe(self) -> str:
        """One line for a person: what was found, or the URL and what was tried."""
        if self.kind is None:
            return f"nothing usable answered at {self.url} (tried {TRIED}): {self.error}"
        models = ", ".join(self.models) if self.models else "no models yet"
        return f"{self.url}: {self.server} ({models})"


def auto_parallel(total_memory_bytes: int) -> int:
    """Requests one model runs at once, from memory (Ollama's former automatic setting;
    the Pool's ``parallel: auto`` and the gateway's Guard Proxy figures)."""
    gib = 1 << 30
    if total_memory_bytes >= 16 * gib:
        return 4
    if total_memory_bytes >= 8 * gib:
        return 2
    return 1


def _json(response: httpx.Response | BaseException | None) -> Any:
    if not isinstance(response, httpx.Response) or not response.is_success:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _failure(response: httpx.Response | BaseException | None) -> str:
    if isinstance(response, httpx.Response):
        return f"HTTP {response.status_code}"
    if isinstance(response, BaseException):
        return str(response) or type(response).__name__
    return "no answer"


def classify(
    url: str,
    tags: httpx.Response | BaseException | None,
    models: httpx.Response | BaseException | None,
    version: httpx.Response | BaseException | None = None,
) -> Detection:
    """The server's kind from its answers to ``/api/tags``, ``/v1/models`` and
    ``/api/version`` (pure: answers in, verdict out)."""
    tags_body = _json(tags)
    if isinstance(tags_body, Mapping) and isinstance(tags_body.get("models"), list):
        names = tuple(
            str(m.get("name") or m.get("model"))
            for m in tags_body["models"]
            if isinstance(m, Mapping) and (m.get("name") or m.get("model"))
        )
        version_body = _json(version)
        number = version_body.get("version") if isinstance(version_body, Mapping) else None
        return Detection(url, "ollama", names, f"Ollama {number}" if number else "Ollama")
    models_body = _json(models)
    if isinstance(models_body, Mapping) and isinstance(models_body.get("data"), list):
        entries = [m for m in models_body["data"] if isinstance(m, Mapping) and m.get("id")]
        owners = {str(m.get("owned_by", "")) for m in entries}
        server = next((_SERVERS[o] for o in sorted(owners) if o in _SERVERS), "")
        return Detection(
            url,
            "openai",
            tuple(str(m["id"]) for m in entries),
            server or "an OpenAI-compatible server",
        )
    reasons = {_failure(tags), _failure(models)}
    return Detection(url, None, error="; ".join(sorted(reasons)))


async def probe(url: str, client: httpx.AsyncClient) -> Detection:
    """Ask one server what it is (each question bounded by the client's timeout)."""
    base = url.rstrip("/")
    tags, models, version = await asyncio.gather(
        client.get(f"{base}/api/tags"),
        client.get(f"{base}/v1/models"),
        client.get(f"{base}/api/version"),
        return_exceptions=True,
    )
    return classify(url, tags, models, version)


async def probe_all(urls: list[str], timeout: float = 5.0) -> list[Detection]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return list(await asyncio.gather(*(probe(url, client) for url in urls)))
