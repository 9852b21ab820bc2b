"""Request ids: ULIDs that end with their model's tag (found by id alone, no index entry),
time-ordered; event ids ordered as numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from usher.ids import (
    MODEL_TAG_CHARS,
    event_id_key,
    is_request_id,
    model_tag,
    new_request_id,
    tag_of,
)


@given(st.text(min_size=1, max_size=200), st.integers(0, 2**48 - 1))
def test_a_request_id_ends_with_its_models_tag(model: str, now_ms: int) -> None:
    request_id = new_request_id(now_ms, model=model)
    assert is_request_id(request_id)
    assert tag_of(request_id) == model_tag(model)
    assert len(model_tag(model)) == MODEL_TAG_CHARS


def test_ids_keep_their_time_order_and_differ_within_a_millisecond() -> None:
    earlier = new_request_id(1_700_000_000_000, model="llama3.2")
    later = new_request_id(1_700_000_000_001, model="llama3.2")
    assert earlier < later
    same = {new_request_id(1_700_000_000_000, model="llama3.2") for _ in range(1000)}
    assert len(same) == 1000
    # Without a model: 80 random bits, as before the tag.
    assert is_request_id(new_request_id())


def test_ids_made_here_from_the_clock_sort_in_the_order_they_were_made() -> None:
    # Thousands within a few milliseconds: many share one (a listing newest first keeps
    # their order), whatever their models' tags.
    made = [new_request_id(model=f"model-{n % 3}") for n in range(5000)]
    assert made == sorted(made)
    assert len(set(made)) == len(made)
    assert all(is_request_id(i) for i in made)


def test_models_are_told_apart_by_their_tags() -> None:
    tags = {model_tag(f"model-{n}") for n in range(1000)}
    assert len(tags) > 990  # 20 bits: a shared tag is rare (and a lookup asks each model)


def test_event_ids_order_as_numbers() -> None:
    assert event_id_key("0-3") == (0, 3)
    assert event_id_key("10-0") > event_id_key("9-99")  # type: ignore[operator]
    assert event_id_key("x-1") is None
