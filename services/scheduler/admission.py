"""What the scheduler checks and derives from a Submit before touching Redis (pure).

``validate_submit`` names every bad field: the simple rules declared on the fields in
proto/ (``buf.validate``: required, lengths, ranges, defined enum values), checked with
protovalidate, then the rules across fields and against this server's limits, here.
``fingerprint`` identifies requests that may share one answer; ``prompt_characters`` feeds
the token-cost estimate.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import protovalidate
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from usher.errors import FieldViolation
from usher.v1 import request_pb2, scheduler_pb2

__all__ = [
    "MAX_BATCH",
    "MAX_JSON_DEPTH",
    "MODEL_NAME",
    "AdmissionLimits",
    "declared_violations",
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
#: Deepest nesting of tools, options.extra and structured messages (each level a Struct,
#: a Value or a list): deeper JSON is refused rather than recursed through.
MAX_JSON_DEPTH = 64


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
        return  # required: a declared rule
    if not MODEL_NAME.fullmatch(model):
        out.append(
            FieldViolation(
                "model", f"{model[:80]!r} is not a model name like 'llama3.2' or 'qwen2.5:0.5b'"
            )
        )
    elif limits.allowed_models and model not in limits.allowed_models:
        out.append(FieldViolation("model", f"{model!r} is not served here"))


def _check_chat(chat: request_pb2.ChatInput, out: list[FieldViolation]) -> None:
    messages = chat.messages
    if messages and not any(m.content.strip() or m.images for m in messages):
        out.append(FieldViolation("chat.messages", "every message is empty"))
    _check_format("chat.format", chat.format, out)


def _check_input(submit: scheduler_pb2.SubmitRequest, out: list[FieldViolation]) -> None:
    kind = submit.WhichOneof("input")
    if kind == "chat":
        _check_chat(submit.chat, out)
    elif kind == "generate":
        if not submit.generate.prompt.strip() and not submit.generate.images:
            out.append(FieldViolation("generate.prompt", "must not be empty"))
        _check_format("generate.format", submit.generate.format, out)
    elif kind == "embed":
        for i, text in enumerate(submit.embed.input):
            if not text.strip():
                out.append(FieldViolation(f"embed.input[{i}]", "must not be empty"))


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


def _check_deadline(
    submit: scheduler_pb2.SubmitRequest, now_seconds: float, out: list[FieldViolation]
) -> None:
    # Against the caller's clock reading (now_seconds), so it is no declared rule.
    if submit.HasField("deadline") and submit.deadline.ToMicroseconds() / 1e6 <= now_seconds:
        out.append(FieldViolation("deadline", "is already past"))


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
    out = declared_violations(submit)
    _check_model(submit.model, limits, out)
    _check_input(submit, out)
    _check_size(submit, limits, out)
    _check_deadline(submit, now_seconds, out)
    for name in ("options", submit.WhichOneof("input")):
        if name and submit.HasField(name):
            problem = _json_problem(getattr(submit, name))
            if problem:
                out.append(FieldViolation(name, problem))
    return out


def declared_violations(message: Message) -> list[FieldViolation]:
    """The message's fields that break the rules proto/ declares on them (protovalidate),
    each named by its path: ``options.temperature``, ``chat.messages[0].role``,
    ``labels[key]``."""
    return [
        FieldViolation(_path(violation.proto.field), violation.proto.message)
        for violation in protovalidate.collect_violations(message)
    ]


def _path(field: protovalidate.FieldPathPb | None) -> str:
    parts = []
    for element in field.elements if field is not None else ():
        subscript = element.subscript
        # A map key or list index; a key is cut short (it is the caller's text).
        index = "" if subscript is None else f"[{str(subscript.value)[:20]}]"
        parts.append(f"{element.field_name}{index}")
    return ".".join(parts)


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
    fallback policy, priority, deadline, queue timeout, result only) within ``scope``, e.g.
    an org."""
    # What the answer depends on, and what decides how and when it is served: a request
    # that may go external must not carry a local-only one along, nor a batch one an urgent
    # one, nor a late deadline an early one, nor a result-only one (no output written while
    # it runs) a caller streaming the tokens.
    work = scheduler_pb2.SubmitRequest(
        model=submit.model,
        options=submit.options,
        fallback_policy=submit.fallback_policy,
        priority=submit.priority,
        result_only=submit.result_only,
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
