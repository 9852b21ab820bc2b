"""Usher's shared runtime: what every service needs once, plus the generated API (usher.v1)."""

__all__: list[str] = []
