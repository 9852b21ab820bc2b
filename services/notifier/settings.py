"""The Notifier's settings: environment variables (USHER_ prefix) or a settings file."""

from __future__ import annotations

from pydantic import Field

from usher.queue.settings import QueueSettings

__all__ = ["NotifierSettings"]


class NotifierSettings(QueueSettings):
    """The queue's defaults (QueueSettings) are the Scheduler's: positions, ETAs and badges
    are computed from them."""

    listen: str = Field("127.0.0.1:50053", validation_alias="USHER_NOTIFIER_LISTEN")
    #: Suggested when every local queue is long, e.g. "gpt-4o-mini".
    external_alternative: str = ""
    position_interval_seconds: float = Field(0.2, gt=0)
    #: Position updates sent per second at most, all watchers together (the rest wait
    #: their turn, newest place only), so a moving queue cannot crowd out other updates.
    position_updates_per_second: float = Field(2000.0, gt=0)
    badge_interval_seconds: float = Field(1.0, gt=0)
    #: How often long-lived objects are frozen out of the garbage collector's walks
    #: (services/notifier/heap.py); 0 = leave the collector as it is.
    heap_freeze_seconds: float = Field(
        2.0, ge=0, validation_alias="USHER_NOTIFIER_HEAP_FREEZE_SECONDS"
    )
