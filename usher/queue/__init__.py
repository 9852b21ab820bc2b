"""The request queue's shared schema: records, the fair order, ETAs and the read side.

The Scheduler writes the queue (services/scheduler/store.py and its Lua scripts) and the
Notifier reads it; both import what they share from here, so neither imports the other.
"""

__all__: list[str] = []
