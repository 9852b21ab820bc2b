"""Scheduler: per-model fair queues on Redis, leases, dedup, timeouts, positions and ETAs."""
