"""``python -m services.notifier``: run one Notifier replica (settings from USHER_* env)."""

from __future__ import annotations

import asyncio
import sys

from services.notifier.app import NotifierApp, NotifierSettings
from usher.config import ConfigError
from usher.logs import configure_logging
from usher.tracing import configure_tracing


def main() -> None:
    try:
        settings = NotifierSettings.from_env()
    except ConfigError as exc:
        print(f"usher-notifier: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure_tracing("usher-notifier")
    asyncio.run(_serve(settings))


async def _serve(settings: NotifierSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await NotifierApp(settings).run()


if __name__ == "__main__":
    main()
