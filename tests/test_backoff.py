from hypothesis import given
from hypothesis import strategies as st

from usher.backoff import exponential_backoff


@given(st.integers(min_value=1, max_value=200), st.floats(min_value=0, max_value=1))
def test_backoff_doubles_to_its_cap_and_jitters_in_the_upper_half(attempt: int, u: float) -> None:
    delay = exponential_backoff(attempt, 0.5, 30.0, uniform=lambda lo, hi: lo + u * (hi - lo))
    ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
    assert ceiling / 2 <= delay <= ceiling


def test_backoff_with_no_base_is_no_wait() -> None:
    assert exponential_backoff(3, 0.0, 30.0) == 0.0
