"""The probe ``usher up`` and every test stack use to know a service is ready."""

from __future__ import annotations

import socket

from usher.testing.processes import free_port, listens


def test_a_listener_is_seen_and_a_free_port_is_not() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert listens(server.getsockname()[1])
    assert not listens(free_port())


def test_a_port_in_the_ephemeral_range_that_nothing_listens_on_is_not_seen() -> None:
    # From 127.0.0.1, probes of such a port now and then met themselves (TCP self-connect)
    # and passed for a listener; many probes find none.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))  # an ephemeral port, bound and not listening
        port = held.getsockname()[1]
    assert not any(listens(port) for _ in range(200))
