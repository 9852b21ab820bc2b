"""``python -m services.pool``: run one Pool replica (settings: USHER_POOL_CONFIG or env)."""

from __future__ import annotations

import asyncio
import sys

from services.pool.app import PoolApp
from services.pool.config import PoolSettings, load_pool_settings
from usher.config import ConfigError
from usher.logs import configure_logging
from usher.tracing import configure_tracing


def main() -> None:
    try:
        settings = load_pool_settings()
    except ConfigError as exc:
        print(f"usher-pool: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure_tracing("usher-pool")
    asyncio.run(_serve(settings))


async def _serve(settings: PoolSettings) -> None:
    # Built inside the running loop: grpc.aio binds its server to the loop that creates it.
    await PoolApp(settings).run()


if __name__ == "__main__":
    main()
