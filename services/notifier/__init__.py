"""Notifier: live status streams for requests and queues."""
