"""Usher services: scheduler, pool, notifier (one package each)."""
