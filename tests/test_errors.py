"""How Redis's refusals reach callers (usher.errors.to_error)."""

from __future__ import annotations

import grpc
import pytest
import redis.exceptions

from usher.errors import to_error


@pytest.mark.parametrize(
    "refusal",
    [
        redis.exceptions.NoPermissionError("NOPERM this user has no permissions to access one"),
        # A command refused inside a script arrives as a plain error with the NOPERM code.
        redis.exceptions.ResponseError("NOPERM this user has no permissions to run 'publish'"),
        redis.exceptions.AuthenticationError("invalid username-password pair"),
    ],
)
def test_a_redis_user_refused_is_internal_not_a_retry(refusal: redis.exceptions.RedisError) -> None:
    """Retrying cannot mend a wrong password or a missing ACL permission: INTERNAL, worded
    for the operator, without Redis's own text (it names keys and commands)."""
    error = to_error(refusal)
    assert error is not None
    assert error.code == grpc.StatusCode.INTERNAL
    assert "ACL" in error.message and "operator" in error.message
    assert "publish" not in error.message


def test_an_unreachable_store_is_still_a_retry() -> None:
    error = to_error(redis.exceptions.ConnectionError("Connection refused"))
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE
