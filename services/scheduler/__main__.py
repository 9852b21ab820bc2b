"""``python -m services.scheduler``: run one scheduler replica (settings from USHER_* env)."""

from __future__ import annotations

from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings
from usher.server import run_service


def main() -> None:
    run_service("usher-scheduler", SchedulerSettings.from_env, SchedulerApp)


if __name__ == "__main__":
    main()
