"""Hypothesis strategies for any protobuf message, built from its descriptor: every field
of every type (scalars over their full range, NaN and infinities included, unknown enum
numbers, nested messages to a bounded depth, repeated and map fields, oneofs, the
well-known Timestamp, Duration and Struct), with optional hints that make some fields
take meaningful values (a served model name, an existing request id) part of the time.

Used by the fuzz tests of every RPC (tests/fuzz); nothing here talks to a server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from google.protobuf import duration_pb2, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

__all__ = ["MAX_DEPTH", "json_values", "message_strategy", "near"]

#: How deep messages nest in generated values (deeper fields stay unset).
MAX_DEPTH = 4
#: Field name → values worth trying beside random ones.
Hints = Mapping[str, Sequence[Any]]

_T = FieldDescriptor
_INTS: dict[int, tuple[int, int]] = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_FIXED32: (0, 2**32 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
    _T.TYPE_FIXED64: (0, 2**64 - 1),
}


def json_values(depth: int = 3) -> st.SearchStrategy[Any]:
    """JSON-like values (what a Struct holds), NaN and infinities included."""
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
    )
    if depth <= 0:
        return leaves
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=8,
    )


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _well_known(descriptor: Descriptor) -> st.SearchStrategy[Message] | None:
    name = descriptor.full_name
    if name == "google.protobuf.Timestamp":
        return st.builds(
            lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
            st.one_of(st.integers(0, 2**33), st.integers(-62135596800, 253402300799)),
            st.integers(0, 999_999_999),
        )
    if name == "google.protobuf.Duration":
        return st.one_of(
            st.builds(
                lambda s, n: duration_pb2.Duration(seconds=s, nanos=n),
                st.integers(0, 315576000000),
                st.integers(0, 999_999_999),
            ),
            st.builds(lambda s: duration_pb2.Duration(seconds=-s), st.integers(0, 10**6)),
        )
    if name == "google.protobuf.Struct":
        return st.dictionaries(st.text(max_size=8), json_values(), max_size=4).map(_struct)
    if name == "google.protobuf.Value":
        return json_values().map(lambda v: _struct({"v": v}).fields["v"])
    return None


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTS:
        low, high = _INTS[kind]
        return st.one_of(st.integers(low, high), st.sampled_from([0, 1, -1, low, high]))
    if kind == _T.TYPE_BOOL:
        return st.booleans()
    if kind == _T.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == _T.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if kind == _T.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.text(max_size=3).map(lambda s: s + "\n"))
    if kind == _T.TYPE_BYTES:
        return st.binary(max_size=40)
    if kind == _T.TYPE_ENUM and field.enum_type is not None:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-3, 40))
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


def _single(field: FieldDescriptor, depth: int, hints: Hints) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return message_strategy(field.message_type, hints, depth + 1)
    base = _scalar(field)
    hinted = hints.get(field.name)
    if hinted:
        return st.one_of(st.sampled_from(list(hinted)), base)
    return base


def _field(field: FieldDescriptor, depth: int, hints: Hints) -> st.SearchStrategy[Any]:
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        key = _single(message_type.fields_by_name["key"], depth, hints)
        value = _single(message_type.fields_by_name["value"], depth, hints)
        return st.dictionaries(key, value, max_size=3)
    if field.is_repeated:
        return st.lists(_single(field, depth, hints), max_size=3)
    return _single(field, depth, hints)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target: Any = getattr(message, field.name)
    message_type = field.message_type
    if message_type is not None and message_type.GetOptions().map_entry:
        value_field = message_type.fields_by_name["value"]
        for key, item in value.items():
            if value_field.message_type is not None:
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        if message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def message_strategy(
    descriptor: Descriptor, hints: Hints | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type: each field set or left unset, any value."""
    hints = hints or {}
    known = _well_known(descriptor)
    if known is not None:
        return known
    cls: Callable[[], Message] = message_factory.GetMessageClass(descriptor)
    if depth >= MAX_DEPTH:
        return st.just(cls())
    fields = list(descriptor.fields)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in fields:
            if draw(st.booleans()):
                _assign(message, field, draw(_field(field, depth, hints)))
        return message

    return build()


def near(
    valid: Message, hints: Hints | None = None, max_changed: int = 2
) -> st.SearchStrategy[Message]:
    """Copies of a ``valid`` message with up to ``max_changed`` of its fields replaced by
    generated values (or cleared): what gets past validation into the logic behind it."""
    descriptor = cast(Descriptor, valid.DESCRIPTOR)
    names = sorted(field.name for field in descriptor.fields)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        fuzzed = draw(message_strategy(descriptor, hints))
        message = type(valid)()
        message.CopyFrom(valid)
        for name in draw(st.sets(st.sampled_from(names), max_size=max_changed)):
            field = descriptor.fields_by_name[name]
            message.ClearField(name)
            value: Any = getattr(fuzzed, name)
            if field.is_repeated:
                getattr(message, name).MergeFrom(value)
            elif field.has_presence and not fuzzed.HasField(name):
                continue
            elif field.message_type is not None:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return build()
