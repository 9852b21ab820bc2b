"""Admission's pure helpers: the fleet's name for a model."""

from __future__ import annotations

from services.scheduler import admission


def test_the_fleets_name_follows_ollamas_implied_latest_tag() -> None:
    known = {"llama3.2:1b", "nomic-embed-text:latest", "phi3"}
    assert admission.fleet_name("llama3.2:1b", known) == "llama3.2:1b"
    assert admission.fleet_name("nomic-embed-text", known) == "nomic-embed-text:latest"
    assert admission.fleet_name("phi3:latest", known) == "phi3"
    assert admission.fleet_name("llama3.2", known) is None  # no guessing between tags
    assert admission.fleet_name("llama3.2:3b", known) is None
