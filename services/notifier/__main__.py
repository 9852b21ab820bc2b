"""``python -m services.notifier``: run one Notifier replica (settings from USHER_* env)."""

from __future__ import annotations

from services.notifier.app import NotifierApp
from services.notifier.settings import NotifierSettings
from usher.server import run_service


def main() -> None:
    run_service("usher-notifier", NotifierSettings.from_env, NotifierApp)


if __name__ == "__main__":
    main()
