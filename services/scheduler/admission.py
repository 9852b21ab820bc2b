"""What the scheduler checks and derives from a Submit before touching Redis (pure).

``validate_submit`` names every bad field; ``fingerprint`` identifies requests that may
share one answer; ``prompt_characters`` feeds the token-cost estimate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from usher.errors import FieldViolation
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "MAX_BATCH",
    "MAX_JSON_DEPTH",
    "MODEL_NAME",
    "AdmissionLimits",
    "fingerprint",
    "fleet_name",
    "input_sizes",
    "is_deterministic",
    "prompt_characters",
    "request_kind",
    "unknown_model_message",
    "validate_batch",
    "validate_submit",
]

#: Ollama-style names: "llama3.2", "qwen2.5:0.5b", "library/model:tag", "hf.co/org/repo:Q4".
#: Braces are excluded because the name becomes a Redis Cluster hash tag.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}(:[A-Za-z0-9._\-]{1,100})?")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")
_ROLES = {"system", "user", "assistant", "tool"}
_MAX_LABELS = 32
_MAX_LABEL_VALUE = 256
_MAX_TRACEPARENT = 256
#: Deepest nesting of tools, options.extra and structured messages (each level a Struct,
#: a Value or a list): deeper JSON is refused rather than recursed through.
MAX_JSON_DEPTH = 64
_MAX_QUEUE_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_prompt_chars: int = 1_000_000
    allowed_models: frozenset[str] = frozenset()


def request_kind(submit: scheduler_pb2.SubmitRequest) -> request_pb2.RequestKind.ValueType:
    match submit.WhichOneof("input"):
        case "chat":
            return request_pb2.REQUEST_KIND_CHAT
        case "generate":
            return request_pb2.REQUEST_KIND_GENERATE
        case "embed":
            return request_pb2.REQUEST_KIND_EMBED
        case _:
            return request_pb2.REQUEST_KIND_UNSPECIFIED


def prompt_characters(submit: scheduler_pb2.SubmitRequest) -> int:
    """Characters of text the model will read (images are not counted)."""
    match submit.WhichOneof("input"):
        case "chat":
            return sum(len(m.content) for m in submit.chat.messages)
        case "generate":
            g = submit.generate
            return len(g.prompt) + len(g.system) + len(g.suffix)
        case "embed":
            return sum(len(text) for text in submit.embed.input)
        case _:
            return 0


def _content_size(value: object) -> int:
    """Characters of every string and bytes of every bytes field in ``value``, nested
    messages, maps and lists included."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, Message):
        return sum(_field_size(field, item) for field, item in value.ListFields())
    return 0


def _field_size(field: FieldDescriptor, value: Any) -> int:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return sum(_content_size(k) + _content_size(v) for k, v in value.items())
    if field.is_repeated:
        return sum(_content_size(item) for item in value)
    return _content_size(value)


def input_sizes(submit: scheduler_pb2.SubmitRequest) -> dict[str, int]:
    """What each top-level field of a Submit stores, in characters (strings) and bytes
    (bytes fields): text, images, tools, labels, keys — everything the request keeps."""
    return {field.name: _field_size(field, value) for field, value in submit.ListFields()}


def _check_format(field: str, value: str, out: list[FieldViolation]) -> None:
    if value in ("", "json"):
        return
    try:
        schema = json.loads(value)
    except ValueError:
        out.append(FieldViolation(field, 'must be "", "json" or a JSON schema object'))
        return
    if not isinstance(schema, dict):
        out.append(FieldViolation(field, "a JSON schema must be an object"))


def _check_model(model: str, limits: AdmissionLimits, out: list[FieldViolation]) -> None:
    if not model:
        out.append(FieldViolation("model", "is required"))
    elif not MODEL_NAME.fullmatch(model):
        out.append(
            FieldViolation(
                "model", f"{model[:80]!r} is not a model name like 'llama3.2' or 'qwen2.5:0.5b'"
            )
        )
    elif limits.allowed_models and model not in limits.allowed_models:
        out.append(FieldViolation("model", f"{model!r} is not served here"))


def _check_chat(chat: request_pb2.ChatInput, out: list[FieldViolation]) -> None:
    messages = chat.messages
    if not messages:
        out.append(FieldViolation("chat.messages", "must not be empty"))
    for i, message in enumerate(messages):
        if message.role not in _ROLES:
            out.append(
                FieldViolation(
                    f"chat.messages[{i}].role", f"must be one of {', '.join(sorted(_ROLES))}"
                )
            )
    if messages and not any(m.content.strip() or m.images for m in messages):
        out.append(FieldViolation("chat.messages", "every message is empty"))
    _check_format("chat.format", chat.format, out)


def _check_input(submit: scheduler_pb2.SubmitRequest, out: list[FieldViolation]) -> None:
    kind = submit.WhichOneof("input")
    if kind is None:
        out.append(FieldViolation("input", "one of chat, generate or embed is required"))
    elif kind == "chat":
        _check_chat(submit.chat, out)
    elif kind == "generate":
        if not submit.generate.prompt.strip() and not submit.generate.images:
            out.append(FieldViolation("generate.prompt", "must not be empty"))
        _check_format("generate.format", submit.generate.format, out)
    else:
        if not submit.embed.input:
            out.append(FieldViolation("embed.input", "must not be empty"))
        for i, text in enumerate(submit.embed.input):
            if not text.strip():
                out.append(FieldViolation(f"embed.input[{i}]", "must not be empty"))
        if submit.embed.dimensions < 0:
            out.append(FieldViolation("embed.dimensions", "must not be negative"))


def _check_size(
    submit: scheduler_pb2.SubmitRequest, limits: AdmissionLimits, out: list[FieldViolation]
) -> None:
    # Everything the request stores counts (images, tools, labels too), or a few large
    # images would fill Redis under a limit meant for text.
    sizes = input_sizes(submit)
    total = sum(sizes.values())
    if total > limits.max_prompt_chars:
        largest = max(sizes, key=lambda name: sizes[name])
        out.append(
            FieldViolation(
                largest,
                f"{total} characters of input (text, images, tools, labels) exceed the limit "
                f"of {limits.max_prompt_chars}",
            )
        )


def _check_serving(
    submit: scheduler_pb2.SubmitRequest, now_seconds: float, out: list[FieldViolation]
) -> None:
    if submit.priority not in request_pb2.Priority.values():
        out.append(FieldViolation("priority", f"{submit.priority} is not a priority class (0-5)"))
    if submit.fallback_policy not in request_pb2.FallbackPolicy.values():
        out.append(
            FieldViolation(
                "fallback_policy", f"{submit.fallback_policy} is not a fallback policy (0-3)"
            )
        )
    if submit.idempotency_key and not _IDEMPOTENCY_KEY.fullmatch(submit.idempotency_key):
        out.append(
            FieldViolation(
                "idempotency_key", "must be 1-128 printable ASCII characters without spaces"
            )
        )
    if submit.HasField("queue_timeout"):
        timeout = submit.queue_timeout.ToTimedelta()
        if timeout <= timedelta(0) or timeout > _MAX_QUEUE_TIMEOUT:
            out.append(FieldViolation("queue_timeout", "must be positive and at most 24h"))
    if submit.HasField("request_timeout"):
        limit = submit.request_timeout.ToTimedelta()
        if limit <= timedelta(0) or limit > _MAX_QUEUE_TIMEOUT:
            out.append(FieldViolation("request_timeout", "must be positive and at most 24h"))
    if submit.HasField("deadline") and submit.deadline.ToMicroseconds() / 1e6 <= now_seconds:
        out.append(FieldViolation("deadline", "is already past"))


def _check_options(options: request_pb2.GenerationOptions, out: list[FieldViolation]) -> None:
    if options.HasField("temperature") and not 0 <= options.temperature <= 100:
        out.append(FieldViolation("options.temperature", "must be between 0 and 100"))
    if options.HasField("num_predict") and options.num_predict < -2:
        out.append(FieldViolation("options.num_predict", "must be -2, -1 or a token count"))
    if options.HasField("num_ctx") and options.num_ctx <= 0:
        out.append(FieldViolation("options.num_ctx", "must be positive"))
    if options.HasField("top_p") and not 0 <= options.top_p <= 1:
        out.append(FieldViolation("options.top_p", "must be between 0 and 1"))
    if options.HasField("top_k") and options.top_k < 0:
        out.append(FieldViolation("options.top_k", "must not be negative"))


def _check_labels(labels: Mapping[str, str], out: list[FieldViolation]) -> None:
    if len(labels) > _MAX_LABELS:
        out.append(FieldViolation("labels", f"at most {_MAX_LABELS} labels"))
    for key, value in labels.items():
        if not key or len(key) > 63:
            out.append(FieldViolation(f"labels[{key[:20]}]", "keys must be 1-63 characters"))
        if len(value) > _MAX_LABEL_VALUE:
            # Labels stay with the request's metadata for the result TTL: they must be small.
            out.append(
                FieldViolation(
                    f"labels[{key[:20]}]", f"values must be at most {_MAX_LABEL_VALUE} characters"
                )
            )


def _json_problem(value: Message, depth: int = 0) -> str:
    """What makes a Struct / Value unfit to become JSON for a model server: a number that
    is not finite, or nesting deeper than ``MAX_JSON_DEPTH``; "" when fine."""
    if depth > MAX_JSON_DEPTH:
        return f"nests deeper than {MAX_JSON_DEPTH} levels"
    for field, item in value.ListFields():
        if field.type == FieldDescriptor.TYPE_DOUBLE and not math.isfinite(item):
            return "holds a number that is not finite (NaN or infinity)"
        if field.message_type is None:
            continue
        children = (
            item.values()
            if field.message_type.GetOptions().map_entry
            else (item if field.is_repeated else [item])
        )
        for child in children:
            problem = _json_problem(child, depth + 1)
            if problem:
                return problem
    return ""


def validate_submit(
    submit: scheduler_pb2.SubmitRequest, limits: AdmissionLimits, now_seconds: float
) -> list[FieldViolation]:
    """Every problem with a Submit, each naming its field. Empty means valid."""
    out: list[FieldViolation] = []
    _check_model(submit.model, limits, out)
    _check_input(submit, out)
    _check_size(submit, limits, out)
    _check_serving(submit, now_seconds, out)
    _check_options(submit.options, out)
    _check_labels(submit.labels, out)
    for name in ("options", submit.WhichOneof("input")):
        if name and submit.HasField(name):
            problem = _json_problem(getattr(submit, name))
            if problem:
                out.append(FieldViolation(name, problem))
    if len(submit.traceparent) > _MAX_TRACEPARENT:
        out.append(FieldViolation("traceparent", f"at most {_MAX_TRACEPARENT} characters"))
    return out


def fleet_name(model: str, known: Collection[str]) -> str | None:
    """The catalogue's name for ``model``: itself, or with Ollama's implied ``:latest``
    added or dropped; None when the fleet offers neither."""
    if model in known:
        return model
    base, sep, tag = model.rpartition(":")
    alternative = base if sep and tag == "latest" else (f"{model}:latest" if not sep else "")
    return alternative if alternative in known else None


def unknown_model_message(model: str, known: Collection[str], shown: int = 20) -> str:
    """NOT_FOUND's text: the model asked for and the ones there are (the first ``shown``)."""
    names = sorted(known)
    listed = ", ".join(names[:shown]) + (
        f" and {len(names) - shown} more" if len(names) > shown else ""
    )
    return f"model {model[:80]!r} is not served by this fleet; models: {listed}"


def is_deterministic(options: request_pb2.GenerationOptions) -> bool:
    """Same input, same output: greedy sampling or a fixed seed."""
    return (options.HasField("temperature") and options.temperature == 0) or options.HasField(
        "seed"
    )


def fingerprint(submit: scheduler_pb2.SubmitRequest, scope: str) -> str:
    """Identity of a request's work (model, input, options, and how it may be served:
    fallback policy, priority, deadline, queue timeout) within ``scope``, e.g. an org."""
    # What the answer depends on, and what decides how and when it is served: a request
    # that may go external must not carry a local-only one along, nor a batch one an urgent
    # one, nor a late deadline an early one.
    work = scheduler_pb2.SubmitRequest(
        model=submit.model,
        options=submit.options,
        fallback_policy=submit.fallback_policy,
        priority=submit.priority,
    )
    for name in ("deadline", "queue_timeout"):
        if submit.HasField(name):
            getattr(work, name).CopyFrom(getattr(submit, name))
    kind = submit.WhichOneof("input")
    if kind is not None:
        getattr(work, kind).CopyFrom(getattr(submit, kind))
    digest = hashlib.sha256(scope.encode() + b"\0" + work.SerializeToString(deterministic=True))
    return digest.hexdigest()[:32]


#: Most requests one SubmitBatch may carry.
MAX_BATCH = 100


def validate_batch(
    batch: Sequence[scheduler_pb2.SubmitRequest], limits: AdmissionLimits, now_seconds: float
) -> list[FieldViolation]:
    """Every request's problems, named ``requests[i].field``; a batch is 1 to MAX_BATCH
    requests for one model (a model's keys share a hash slot: one atomic admission)."""
    if not 1 <= len(batch) <= MAX_BATCH:
        return [FieldViolation("requests", f"send 1 to {MAX_BATCH} requests")]
    out: list[FieldViolation] = []
    for index, request in enumerate(batch):
        for violation in validate_submit(request, limits, now_seconds):
            out.append(
                FieldViolation(f"requests[{index}].{violation.field}", violation.description)
            )
        if request.model != batch[0].model:
            out.append(FieldViolation(f"requests[{index}].model", "a batch is for one model"))
    return out
