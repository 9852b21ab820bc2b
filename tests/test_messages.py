from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from usher import messages


def test_the_products_own_examples() -> None:
    assert (
        messages.position_message(3, 7, 130, 170)
        == "You are #3 of 7 in the queue • Estimated wait: 2–3 minutes"
    )
    assert messages.progress_message(0.8) == "Processing is 80% complete • Almost ready!"
    assert messages.ready_message(45) == "Your response is ready! Processing took 45 seconds."


def test_wait_phrases() -> None:
    assert messages.wait_phrase(5, 40) == "less than a minute"
    assert messages.wait_phrase(60, 100) == "1–2 minutes"
    assert messages.wait_phrase(120, 120) == "2 minutes"
    assert messages.wait_phrase(4000, 7000) == "1–2 hours"


@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_wait_phrase_is_always_words(a: float, b: float) -> None:
    phrase = messages.wait_phrase(a, b)
    assert phrase
    assert not re.search(r"(^|\D)0 (second|minute|hour)|-\d", phrase), phrase


def test_a_request_the_external_provider_serves_is_told_why_and_never_of_the_local_model() -> None:
    from usher import messages
    from usher.v1 import notifier_pb2, request_pb2

    request = request_pb2.LlmRequest(
        state=request_pb2.REQUEST_STATE_RUNNING,
        route=request_pb2.ROUTE_EXTERNAL,
        route_reason="unavailable",
    )
    # The hand-over is announced even when the request already runs as it is read.
    assert (
        messages.request_message(request, notifier_pb2.UPDATE_KIND_FALLBACK)
        == messages.UNAVAILABLE_NOTICE
    )
    assert messages.request_message(request) == messages.EXTERNAL_PROCESSING
    request.route = request_pb2.ROUTE_LOCAL
    assert messages.request_message(request) == messages.LOCAL_PROCESSING


def test_badge_labels_as_the_model_picker_shows_them() -> None:
    def label(queued: int, low: float, high: float, **how: bool) -> str:
        flags = {"available": False, "full": False, "long_wait": False, **how}
        return messages.badge_label("qwq", queued, low, high, **flags)

    assert label(0, 0, 0, available=True) == "qwq (Available now)"
    assert label(9, 130, 170, full=True) == "qwq (Queue full - 2–3 minutes wait)"
    assert label(8, 300, 370, long_wait=True) == "qwq (8 in queue - 6+ min wait)"
    assert label(2, 30, 60) == "qwq (2 in queue)"
    # A free slot is said first, even on a queue at its limit.
    assert label(0, 0, 0, available=True, full=True) == "qwq (Available now)"
