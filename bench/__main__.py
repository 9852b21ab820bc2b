"""``python -m bench [scenario ...]``: run benchmark scenarios, one JSON line each."""

from __future__ import annotations

import asyncio
import sys

from bench import (
    chaos_bench,
    e2e_bench,
    eta_bench,
    fairness_bench,
    fleet_bench,
    gateway_bench,
    notifier_bench,
    pool_bench,
    real_bench,
    scheduler_bench,
)

SCENARIOS = {
    "scheduler": scheduler_bench.run,
    "pool": pool_bench.run,
    "e2e": e2e_bench.run,
    "notifier": notifier_bench.run,
    "gateway": gateway_bench.run,
    "fairness": fairness_bench.run,
    "eta": eta_bench.run,
    "chaos": chaos_bench.run,
    "real": real_bench.run,
    "fleet": fleet_bench.run,
}


def main() -> None:
    chosen = sys.argv[1:] or list(SCENARIOS)
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    for name in chosen:
        asyncio.run(SCENARIOS[name]())


if __name__ == "__main__":
    main()
