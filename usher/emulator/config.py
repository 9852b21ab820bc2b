"""Configuration of an emulated Ollama instance: the models it offers, its speed,
its scheduler limits and the faults it should inject.

Plain dataclasses with ``from_dict`` / ``to_dict`` so the same shapes serve the
Python API, the CLI's ``--config`` file and the admin endpoints.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, Literal

from usher.emulator.durations import parse_keep_alive_setting, parse_size

__all__ = [
    "CATALOG",
    "DEFAULT_MODELS",
    "RUNNER_STOPPED_MESSAGE",
    "EmulatorConfig",
    "FaultConfig",
    "ModelSpec",
    "canonical_model_name",
    "model_spec",
    "parse_model_list",
]

#: What Ollama says when its llama runner dies under a request.
RUNNER_STOPPED_MESSAGE = (
    "model runner has unexpectedly stopped, this may be due to resource limitations "
    "or an internal error, check ollama server logs for details"
)

# A fixed "pulled at" time keeps /api/tags byte-stable across runs.
_MODIFIED_AT = datetime(2025, 1, 1, tzinfo=UTC)

_REGISTRY_PREFIXES = ("registry.ollama.ai/library/", "registry.ollama.ai/", "library/")


def canonical_model_name(name: str) -> str:
    """Normalise a model reference the way Ollama matches it: default registry and
    namespace dropped, ``:latest`` added when there is no tag, lower-cased."""
    n = name.strip()
    low = n.lower()
    for prefix in _REGISTRY_PREFIXES:
        if low.startswith(prefix):
            n = n[len(prefix) :]
            break
    last = n.rsplit("/", 1)[-1]
    if ":" not in last:
        n = n + ":latest"
    return n.lower()


@dataclass(frozen=True)
class ModelSpec:
    """One model the instance offers (what ``ollama pull`` would have put on disk)."""

    name: str
    size: int
    parameter_size: str = "1B"
    family: str = "llama"
    quantization: str = "Q4_K_M"
    context_length: int = 131072
    embedding_length: int = 2048
    capabilities: tuple[str, ...] = ("completion",)
    format: str = "gguf"
    #: KV-cache bytes per context token per slot; makes a bigger num_ctx cost memory.
    kv_bytes_per_token: int = 0
    #: Per-model override of the instance's parallel slots.
    parallel: int | None = None
    #: Per-model override of the instance's load time (seconds).
    load_seconds: float | None = None
    #: Per-model override of the instance's tokens/s.
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", canonical_model_name(self.name))
        object.__setattr__(self, "capabilities", tuple(self.capabilities))

    @property
    def digest(self) -> str:
        # Stable per name, 64 hex chars like a sha256 manifest digest.
        return hashlib.sha256(f"usher-emulator:{self.name}".encode()).hexdigest()

    @property
    def modified_at(self) -> datetime:
        return _MODIFIED_AT

    @property
    def is_embedding(self) -> bool:
        return "completion" not in self.capabilities

    def effective_parallel(self, instance_parallel: int) -> int:
        """Slots when loaded; Ollama always loads embedding models with parallel=1."""
        if self.parallel is not None:
            return max(1, self.parallel)
        return 1 if self.is_embedding else max(1, instance_parallel)

    def effective_num_ctx(self, requested: int) -> int:
        """Ollama clamps num_ctx to [4, trained context length]."""
        return max(4, min(requested, self.context_length))

    def memory_for(self, num_ctx: int, parallel: int) -> int:
        """Bytes resident while loaded (reported as size / size_vram in /api/ps)."""
        return self.size + self.kv_bytes_per_token * num_ctx * parallel

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization,
        }

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build from a mapping; missing fields come from the catalog / name guess."""
        if "name" not in data:
            raise ValueError("model spec needs a name")
        base = model_spec(str(data["name"]))
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model spec fields: {sorted(unknown)}")
        updates: dict[str, Any] = {}
        for key, value in data.items():
            if key == "name":
                continue
            if key == "size":
                value = parse_size(value)
            elif key == "capabilities":
                value = tuple(value)
            updates[key] = value
        return replace(base, **updates)


def _spec(
    name: str,
    size: int,
    params: str,
    family: str,
    quant: str,
    ctx: int,
    emb: int,
    caps: tuple[str, ...] = ("completion", "tools"),
) -> ModelSpec:
    return ModelSpec(
        name=name,
        size=size,
        parameter_size=params,
        family=family,
        quantization=quant,
        context_length=ctx,
        embedding_length=emb,
        capabilities=caps,
    )


#: Well-known models with realistic sizes (bytes on disk) and metadata.
CATALOG: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _spec("llama3.2:1b", 1_321_098_329, "1.2B", "llama", "Q8_0", 131072, 2048),
        _spec("llama3.2:3b", 2_019_393_189, "3.2B", "llama", "Q4_K_M", 131072, 3072),
        _spec("llama3.2:latest", 2_019_393_189, "3.2B", "llama", "Q4_K_M", 131072, 3072),
        _spec("llama3.1:8b", 4_920_753_328, "8.0B", "llama", "Q4_K_M", 131072, 4096),
        _spec("qwen2.5:0.5b", 397_821_319, "494.03M", "qwen2", "Q4_K_M", 32768, 896),
        _spec("qwen2.5:1.5b", 986_061_892, "1.5B", "qwen2", "Q4_K_M", 32768, 1536),
        _spec("qwen2.5:7b", 4_683_087_332, "7.6B", "qwen2", "Q4_K_M", 32768, 3584),
        _spec("mistral:7b", 4_113_301_824, "7.2B", "llama", "Q4_0", 32768, 4096),
        _spec(
            "gemma3:1b", 815_319_791, "999.89M", "gemma3", "Q4_K_M", 32768, 1152, ("completion",)
        ),
        _spec("phi3:mini", 2_176_178_913, "3.8B", "phi3", "Q4_0", 131072, 3072, ("completion",)),
        _spec(
            "nomic-embed-text:latest",
            274_302_450,
            "137M",
            "nomic-bert",
            "F16",
            2048,
            768,
            ("embedding",),
        ),
        _spec("all-minilm:latest", 45_960_996, "23M", "bert", "F16", 512, 384, ("embedding",)),
        _spec(
            "mxbai-embed-large:latest",
            669_615_493,
            "334M",
            "bert",
            "F16",
            512,
            1024,
            ("embedding",),
        ),
    )
}

DEFAULT_MODELS: tuple[str, ...] = ("llama3.2:1b", "qwen2.5:0.5b", "nomic-embed-text:latest")

_PARAMS_IN_TAG = re.compile(r"(?:^|[:\-_])(\d+(?:\.\d+)?)([bm])(?:$|[\-_])", re.IGNORECASE)


def _guess_spec(name: str) -> ModelSpec:
    # Unknown models: infer parameters from a tag like ":7b" and assume ~4.8 bits
    # per weight (Q4_K_M), so sizes scale believably.
    canonical = canonical_model_name(name)
    base, _, tag = canonical.partition(":")
    match = _PARAMS_IN_TAG.search(tag) or _PARAMS_IN_TAG.search(base)
    params = 1e9
    label = "1B"
    if match:
        value = float(match.group(1))
        params = value * (1e9 if match.group(2).lower() == "b" else 1e6)
        label = f"{match.group(1)}{match.group(2).upper()}"
    family = re.sub(r"[^a-z]+.*$", "", base.rsplit("/", 1)[-1]) or "llama"
    embedding = "embed" in canonical
    return ModelSpec(
        name=canonical,
        size=int(params * 0.6),
        parameter_size=label,
        family=family,
        quantization="F16" if embedding else "Q4_K_M",
        context_length=8192 if embedding else 32768,
        embedding_length=768 if embedding else 2048,
        capabilities=("embedding",) if embedding else ("completion",),
    )


def model_spec(text: str) -> ModelSpec:
    """Resolve ``name`` or ``name@size`` (e.g. ``big:7b@4.7GB``) to a spec."""
    name, _, size = text.strip().partition("@")
    canonical = canonical_model_name(name)
    spec = CATALOG.get(canonical) or _guess_spec(canonical)
    if size:
        spec = replace(spec, size=parse_size(size))
    return spec


def parse_model_list(text: str) -> list[ModelSpec]:
    """Parse the CLI's comma-separated ``--models`` value."""
    return [model_spec(part) for part in text.split(",") if part.strip()]


_FAULT_INT_OR_NONE = {
    "error_after_tokens",
    "error_times",
    "drop_after_tokens",
    "drop_times",
    "crash_after_tokens",
    "hang_after_tokens",
}


@dataclass
class FaultConfig:
    """Failure injection, changeable at runtime (``POST /_emulator/faults``).

    ``*_times`` fields limit how many requests a fault hits (``None``: every
    request while the fault is set); they count down and clear the fault at 0.
    """

    #: The next N inference requests fail with ``fail_status`` before any output.
    fail_next: int = 0
    fail_status: int = 500
    fail_message: str = RUNNER_STOPPED_MESSAGE
    #: After N tokens a stream ends with a final ``{"error": ...}`` line (HTTP 200).
    error_after_tokens: int | None = None
    error_times: int | None = None
    error_message: str = RUNNER_STOPPED_MESSAGE
    #: After N tokens the TCP connection is aborted (no final line).
    drop_after_tokens: int | None = None
    drop_times: int | None = None
    #: After N tokens the whole instance crashes (process exit or listener closed).
    crash_after_tokens: int | None = None
    #: Every Ollama API route stops answering (admin routes keep working).
    hang: bool = False
    #: Streams stall forever after N tokens.
    hang_after_tokens: int | None = None

    def update(self, data: Mapping[str, Any]) -> None:
        """Apply a partial update with type checks (raises ``ValueError``)."""
        known = {f.name for f in fields(self)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        for key, value in data.items():
            if key == "hang":
                if not isinstance(value, bool):
                    raise ValueError("hang must be a boolean")
            elif key in ("fail_message", "error_message"):
                if not isinstance(value, str):
                    raise ValueError(f"{key} must be a string")
            elif key in _FAULT_INT_OR_NONE:
                if value is not None and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 0
                ):
                    raise ValueError(f"{key} must be a non-negative integer or null")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{key} must be a non-negative integer")
            setattr(self, key, value)

    def clear(self) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(FaultConfig(), f.name))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


QueueScope = Literal["all", "load"]

# Fields an admin may change on a running instance.
RUNTIME_FIELDS = frozenset(
    {"tokens_per_second", "time_to_first_token", "load_time", "output_tokens", "seed"}
)


@dataclass
class EmulatorConfig:
    """Everything that characterises one emulated Ollama server."""

    models: list[ModelSpec] = field(
        default_factory=lambda: [CATALOG[name] for name in DEFAULT_MODELS]
    )
    host: str = "127.0.0.1"
    port: int = 0
    #: Label used in logs and stats (defaults to the URL once started).
    name: str = ""
    version: str = "0.32.15"
    #: Decode speed; ``0`` is "instant": tokens are produced without any pacing.
    #: Each delay below is independent; set all three to 0 (CLI ``--instant``) for a
    #: zero-delay benchmark mode that never sleeps.
    tokens_per_second: float = 50.0
    #: Prompt evaluation time before the first token, seconds (0: none).
    time_to_first_token: float = 0.05
    #: Time to load a model, charged as load_duration (0: none; per-model override
    #: in ModelSpec).
    load_time: float = 0.5
    #: OLLAMA_NUM_PARALLEL: concurrent requests per loaded model.
    num_parallel: int = 1
    #: OLLAMA_MAX_QUEUE: waiting requests beyond which requests get 503.
    max_queue: int = 512
    #: "all": every waiting request counts toward max_queue; "load": only requests
    #: that need a model load count, as in Ollama's code (slot waits are unbounded).
    max_queue_scope: QueueScope = "all"
    #: OLLAMA_MAX_LOADED_MODELS; 0 means Ollama's automatic 3 (per GPU).
    max_loaded_models: int = 0
    #: Memory available for loaded models, bytes; 0 means unlimited.
    memory_budget: int = 16 * 1024**3
    #: OLLAMA_KEEP_ALIVE, seconds (math.inf: forever).
    default_keep_alive: float = 300.0
    #: Context length used when a request sets no num_ctx.
    default_num_ctx: int = 4096
    #: Natural response length range (tokens) before num_predict caps it.
    output_tokens: tuple[int, int] = (16, 64)
    #: Salt mixed into generation so different fleets can differ deterministically.
    seed: int = 0
    #: Override every model's embedding dimension.
    embedding_dim: int | None = None
    #: Report size_vram 0 (a CPU-only host).
    cpu_only: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)

    @property
    def instant(self) -> bool:
        """Tokens are not paced (tokens_per_second <= 0)."""
        return self.tokens_per_second <= 0

    def make_instant(self) -> None:
        """Zero-delay mode: no load time, no prompt evaluation time, no pacing."""
        self.tokens_per_second = 0.0
        self.time_to_first_token = 0.0
        self.load_time = 0.0

    @property
    def loaded_models_limit(self) -> int:
        return self.max_loaded_models if self.max_loaded_models > 0 else 3

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "models":
                value = [m.to_dict() for m in value]
            elif f.name == "faults":
                value = value.to_dict()
            elif f.name == "output_tokens":
                value = list(value)
            elif isinstance(value, float) and math.isinf(value):
                value = -1
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmulatorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "models":
                if isinstance(value, str):
                    kwargs[key] = parse_model_list(value)
                else:
                    kwargs[key] = [
                        model_spec(m) if isinstance(m, str) else ModelSpec.from_dict(m)
                        for m in value
                    ]
            elif key == "faults":
                faults = FaultConfig()
                faults.update(value)
                kwargs[key] = faults
            elif key == "memory_budget":
                kwargs[key] = parse_size(value)
            elif key == "default_keep_alive":
                kwargs[key] = parse_keep_alive_setting(value)
            elif key == "output_tokens":
                lo, hi = value
                kwargs[key] = (int(lo), int(hi))
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def apply_runtime(self, data: Mapping[str, Any]) -> None:
        """Change speed-related settings on a running instance."""
        unknown = set(data) - RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"not changeable at runtime: {sorted(unknown)}")
        for key, value in data.items():
            if key == "output_tokens":
                lo, hi = value
                value = (int(lo), int(hi))
            elif key == "seed":
                value = int(value)
            else:
                value = float(value)
            setattr(self, key, value)

    def find_model(self, name: str) -> ModelSpec | None:
        canonical = canonical_model_name(name)
        for spec in self.models:
            if spec.name == canonical:
                return spec
        return None

    def embedding_dim_for(self, spec: ModelSpec) -> int:
        return self.embedding_dim or spec.embedding_length
