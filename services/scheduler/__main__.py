"""``python -m services.scheduler``: run one scheduler replica (settings from USHER_* env)."""

from __future__ import annotations

import asyncio
import sys

from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from usher.config import ConfigError
from usher.logs import configure_logging
from usher.tracing import configure_tracing


def main() -> None:
    try:
        settings = SchedulerSettings.from_env()
    except ConfigError as exc:
        print(f"usher-scheduler: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure_tracing("usher-scheduler")
    asyncio.run(_serve(settings))


async def _serve(settings: SchedulerSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await SchedulerApp(settings).run()


if __name__ == "__main__":
    main()
