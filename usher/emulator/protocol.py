"""Ollama's native wire format, without HTTP: decoding request bodies with the
same validation errors Go's ``encoding/json`` would give, and building response
objects with Ollama's field order and ``omitempty`` rules.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from usher.emulator import textgen
from usher.emulator.config import ModelSpec
from usher.emulator.durations import DurationError, format_rfc3339, parse_keep_alive, utcnow
from usher.emulator.engine import ApiError, Metrics
from usher.emulator.scheduler import LoadedModel

__all__ = [
    "ChatParams",
    "EmbedParams",
    "EmbeddingsParams",
    "GenerateParams",
    "Options",
    "chat_chunk",
    "chat_final",
    "chat_prompt_tokens",
    "decode_body",
    "generate_chunk",
    "generate_final",
    "generate_prompt_tokens",
    "go_quote",
    "json_kind",
    "metrics_fields",
    "model_name_error",
    "parse_chat",
    "parse_embed",
    "parse_embeddings",
    "parse_generate",
    "parse_options",
    "prompt_key",
    "ps_entry",
    "show_body",
    "str_field",
    "tags_entry",
    "typed_field",
]

_THINK_LEVELS = ("high", "medium", "low", "max")
# Roughly model.ParseName's accepted characters; anything else is "invalid model name".
_MODEL_NAME = re.compile(
    r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*){0,2}"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$"
)


def go_quote(text: str) -> str:
    """Go's ``%q`` for the plain strings we quote (model names, values)."""
    return json.dumps(text, ensure_ascii=False)


def json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_char(ch: str) -> str:
    if ch == "'":
        return "'\\''"
    if ch == '"':
        return "'\"'"
    return f"'{ch}'"


def decode_body(raw: bytes, struct: str) -> dict[str, Any]:
    """Decode a JSON object body; errors read like gin's ``ShouldBindJSON``."""
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        raise ApiError(400, "missing request body")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise ApiError(400, "unexpected EOF") from None
        raise ApiError(
            400, f"invalid character {_go_char(text[exc.pos])} looking for beginning of value"
        ) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(
            400, f"json: cannot unmarshal {json_kind(value)} into Go value of type api.{struct}"
        )
    return value


def typed_field(body: Mapping[str, Any], struct: str, name: str, kind: str, gotype: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    actual = json_kind(value)
    if actual != kind:
        raise ApiError(
            400,
            f"json: cannot unmarshal {actual} into Go struct field {struct}.{name} "
            f"of type {gotype}",
        )
    if gotype == "int" and isinstance(value, float) and not value.is_integer():
        raise ApiError(
            400,
            f"json: cannot unmarshal number {value} into Go struct field {struct}.{name} "
            f"of type int",
        )
    return value


def str_field(body: Mapping[str, Any], struct: str, name: str) -> str:
    value = typed_field(body, struct, name, "string", "string")
    return "" if value is None else str(value)


def _bool(body: Mapping[str, Any], struct: str, name: str) -> bool | None:
    value = typed_field(body, struct, name, "bool", "bool")
    return None if value is None else bool(value)


def _keep_alive(body: Mapping[str, Any]) -> float | None:
    try:
        return parse_keep_alive(body.get("keep_alive"))
    except DurationError as exc:
        raise ApiError(400, str(exc)) from None


def _think(body: Mapping[str, Any]) -> bool | str | None:
    value = body.get("think")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value not in _THINK_LEVELS:
            raise ApiError(
                400,
                f'invalid think value: {go_quote(value)} (must be "high", "medium", "low", '
                f'"max", true, or false)',
            )
        return value
    raise ApiError(
        400, 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'
    )


def _top_logprobs(body: Mapping[str, Any], struct: str) -> None:
    typed_field(body, struct, "logprobs", "bool", "bool")
    top = typed_field(body, struct, "top_logprobs", "number", "int")
    if top is not None and not 0 <= top <= 20:
        raise ApiError(400, "top_logprobs must be between 0 and 20")


def model_name_error(name: str) -> bool:
    """True if Ollama would answer "invalid model name" (empty is handled apart)."""
    return bool(name) and (len(name) > 350 or _MODEL_NAME.match(name.strip()) is None)


@dataclass(frozen=True)
class Options:
    """The request ``options`` the emulator acts on."""

    num_ctx: int | None = None
    num_predict: int | None = None
    seed: int | None = None


def parse_options(raw: object) -> Options:
    """Validate ``options`` like ``api.Options.FromMap`` (errors surface as 500s)."""
    if not isinstance(raw, Mapping):
        return Options()
    values: dict[str, int | None] = {}
    for key in ("num_ctx", "num_predict", "seed"):
        value = raw.get(key)
        if value is None:
            values[key] = None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(500, f"option {go_quote(key)} must be of type integer")
        values[key] = int(value)
    return Options(**values)


@dataclass
class GenerateParams:
    model: str
    prompt: str
    system: str
    template: str
    suffix: str
    context: list[int] | None
    raw: bool
    stream: bool
    keep_alive: float | None
    options: object
    format: object
    think: bool | str | None


def parse_generate(body: Mapping[str, Any]) -> GenerateParams:
    s = "GenerateRequest"
    model = str_field(body, s, "model")
    prompt = str_field(body, s, "prompt")
    system = str_field(body, s, "system")
    template = str_field(body, s, "template")
    suffix = str_field(body, s, "suffix")
    context = typed_field(body, s, "context", "array", "[]int")
    if context is not None and not all(
        isinstance(t, (int, float)) and not isinstance(t, bool) for t in context
    ):
        raise ApiError(
            400, f"json: cannot unmarshal string into Go struct field {s}.context of type int"
        )
    stream = _bool(body, s, "stream")
    raw = _bool(body, s, "raw")
    typed_field(body, s, "images", "array", "[]api.ImageData")
    typed_field(body, s, "options", "object", "map[string]interface {}")
    _bool(body, s, "truncate")
    _bool(body, s, "shift")
    _top_logprobs(body, s)
    return GenerateParams(
        model=model,
        prompt=prompt,
        system=system,
        template=template,
        suffix=suffix,
        context=[int(t) for t in context] if context is not None else None,
        raw=bool(raw),
        stream=stream is not False,
        keep_alive=_keep_alive(body),
        options=body.get("options"),
        format=body.get("format"),
        think=_think(body),
    )


@dataclass
class ChatParams:
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    keep_alive: float | None
    options: object
    format: object
    think: bool | str | None
    tools: list[Any] = field(default_factory=list)


def parse_chat(body: Mapping[str, Any]) -> ChatParams:
    s = "ChatRequest"
    model = str_field(body, s, "model")
    messages = typed_field(body, s, "messages", "array", "[]api.Message") or []
    parsed: list[dict[str, Any]] = []
    for msg in messages:
        if msg is None:
            parsed.append({"role": "", "content": ""})
            continue
        if not isinstance(msg, dict):
            raise ApiError(
                400,
                f"json: cannot unmarshal {json_kind(msg)} into Go struct field {s}.messages "
                "of type api.Message",
            )
        for key in ("role", "content", "thinking", "tool_name", "tool_call_id"):
            value = msg.get(key)
            if value is not None and not isinstance(value, str):
                raise ApiError(
                    400,
                    f"json: cannot unmarshal {json_kind(value)} into Go struct field "
                    f"{s}.messages.{key} of type string",
                )
        parsed.append(
            {"role": str(msg.get("role") or "").lower(), "content": str(msg.get("content") or "")}
        )
    stream = _bool(body, s, "stream")
    tools = typed_field(body, s, "tools", "array", "api.Tools") or []
    typed_field(body, s, "options", "object", "map[string]interface {}")
    _bool(body, s, "truncate")
    _bool(body, s, "shift")
    _top_logprobs(body, s)
    return ChatParams(
        model=model,
        messages=parsed,
        stream=stream is not False,
        keep_alive=_keep_alive(body),
        options=body.get("options"),
        format=body.get("format"),
        think=_think(body),
        tools=list(tools),
    )


@dataclass
class EmbedParams:
    model: str
    inputs: list[str]
    keep_alive: float | None
    options: object
    dimensions: int | None
    truncate: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def parse_embed(body: Mapping[str, Any]) -> EmbedParams:
    s = "EmbedRequest"
    model = str_field(body, s, "model")
    truncate = _bool(body, s, "truncate")
    dimensions = typed_field(body, s, "dimensions", "number", "int")
    typed_field(body, s, "options", "object", "map[string]interface {}")
    keep_alive = _keep_alive(body)
    raw = body.get("input")
    inputs: list[str] = []
    if isinstance(raw, str):
        if raw:
            inputs.append(raw)
    elif isinstance(raw, list):
        for item in raw:
            if not isinstance(item, str):
                raise ApiError(400, "invalid input type")
            inputs.append(item)
    elif raw is not None:
        raise ApiError(400, "invalid input type")
    return EmbedParams(
        model=model,
        inputs=inputs,
        keep_alive=keep_alive,
        options=body.get("options"),
        dimensions=int(dimensions) if dimensions is not None else None,
        truncate=truncate,
    )


@dataclass
class EmbeddingsParams:
    model: str
    prompt: str
    keep_alive: float | None
    options: object


def parse_embeddings(body: Mapping[str, Any]) -> EmbeddingsParams:
    s = "EmbeddingRequest"
    model = str_field(body, s, "model")
    prompt = str_field(body, s, "prompt")
    typed_field(body, s, "options", "object", "map[string]interface {}")
    return EmbeddingsParams(
        model=model, prompt=prompt, keep_alive=_keep_alive(body), options=body.get("options")
    )


# -- responses -----------------------------------------------------------------


def metrics_fields(m: Metrics) -> dict[str, int]:
    """Ollama's ``Metrics`` with ``omitempty``: zero values are left out."""
    out: dict[str, int] = {}
    for key in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        value = getattr(m, key)
        if value:
            out[key] = value
    return out


def _created() -> str:
    return format_rfc3339(utcnow())


def generate_chunk(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "created_at": _created(), "response": text, "done": False}


def generate_final(
    model: str,
    *,
    text: str,
    done_reason: str,
    metrics: Metrics | None = None,
    context: list[int] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model,
        "created_at": _created(),
        "response": text,
        "done": True,
        "done_reason": done_reason,
    }
    if context:
        out["context"] = context
    if metrics is not None:
        out.update(metrics_fields(metrics))
    return out


def chat_chunk(model: str, text: str) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _created(),
        "message": {"role": "assistant", "content": text},
        "done": False,
    }


def chat_final(
    model: str, *, text: str, done_reason: str, metrics: Metrics | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model,
        "created_at": _created(),
        "message": {"role": "assistant", "content": text},
        "done": True,
        "done_reason": done_reason,
    }
    if metrics is not None:
        out.update(metrics_fields(metrics))
    return out


def tags_entry(spec: ModelSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "model": spec.name,
        "modified_at": format_rfc3339(spec.modified_at),
        "size": spec.size,
        "digest": spec.digest,
        "details": spec.details(),
    }


def ps_entry(loaded: LoadedModel) -> dict[str, Any]:
    spec = loaded.spec
    return {
        "name": spec.name,
        "model": spec.name,
        "size": loaded.size,
        "digest": spec.digest,
        "details": spec.details(),
        "expires_at": format_rfc3339(loaded.expires_at),
        "size_vram": loaded.size_vram,
        "context_length": loaded.num_ctx,
    }


def show_body(
    spec: ModelSpec, embedding_dim: int, modified_at: datetime | None = None
) -> dict[str, Any]:
    arch = spec.family  # GGUF keys keep the name as is, e.g. "nomic-bert.context_length"
    param_count = _param_count(spec.parameter_size)
    model_info: dict[str, Any] = {
        "general.architecture": arch,
        "general.file_type": 15,
        "general.parameter_count": param_count,
        "general.quantization_version": 2,
        f"{arch}.context_length": spec.context_length,
        f"{arch}.embedding_length": embedding_dim,
    }
    template = "" if spec.is_embedding else "{{ .Prompt }}"
    return {
        "license": "",
        "modelfile": (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {spec.name}\n\n"
            f"FROM {spec.name}\n" + (f"TEMPLATE {template}\n" if template else "")
        ),
        "parameters": "",
        "template": template,
        "details": spec.details(),
        "model_info": model_info,
        "capabilities": list(spec.capabilities),
        "modified_at": format_rfc3339(modified_at or spec.modified_at),
    }


def _param_count(label: str) -> int:
    match = re.match(r"^([0-9.]+)([KMBT]?)$", label.strip().upper())
    if not match:
        return 0
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


def prompt_key(spec: ModelSpec, *parts: object) -> str:
    """The generation key: model plus everything that shapes the answer."""
    return "\x1e".join([spec.name, *map(str, parts)])


def generate_prompt_tokens(p: GenerateParams) -> int:
    overhead = 0 if p.raw else 8  # chat template tokens around the prompt
    return (
        textgen.count_tokens(p.system)
        + textgen.count_tokens(p.prompt)
        + overhead
        + len(p.context or [])
    )


def chat_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(textgen.count_tokens(m["content"]) + 4 for m in messages) + 1
