"""``python -m services.pool``: run one Pool replica (settings: USHER_POOL_CONFIG or env)."""

from __future__ import annotations

from services.pool.app import PoolApp
from services.pool.settings import load_pool_settings
from usher.server import run_service


def main() -> None:
    run_service("usher-pool", load_pool_settings, PoolApp)


if __name__ == "__main__":
    main()
