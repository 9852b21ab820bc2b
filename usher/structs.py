"""Protobuf's well-known types to and from plain Python: Struct for the free-form JSON parts
of the API (tool definitions, extra options, chat messages with tool calls), Duration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2

__all__ = ["dict_to_struct", "duration_from_seconds", "plain_json", "struct_to_dict"]


def plain_json(value: Any) -> Any:
    """Struct numbers are doubles; give integral ones back as ints so ``{"num_gpu": 1}`` is
    sent as ``1``, not ``1.0`` (Go servers reject fractions for ints)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_json(v) for v in value]
    return value


def struct_to_dict(value: struct_pb2.Struct) -> dict[str, Any]:
    out = plain_json(json_format.MessageToDict(value))
    assert isinstance(out, dict)
    return out


def dict_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(dict(value))
    return message


def duration_from_seconds(seconds: float) -> duration_pb2.Duration:
    """A Duration to the millisecond (never negative)."""
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(max(0, round(seconds * 1000)))
    return duration
