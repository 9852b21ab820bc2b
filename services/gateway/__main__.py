"""``python -m services.gateway`` / ``usher-gateway``: the HTTP front door (settings from
USHER_* env, see ``services.gateway.settings``)."""

from __future__ import annotations

import sys

from services.gateway.app import serve
from services.gateway.settings import GatewaySettings
from usher import eventloop
from usher.config import ConfigError
from usher.logs import configure_logging
from usher.production import require_production_ready
from usher.tracing import configure_tracing

__all__ = ["main"]


def main() -> None:
    try:
        require_production_ready()
        settings = GatewaySettings.from_env()
    except ConfigError as exc:
        print(f"usher-gateway: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level)
    configure_tracing("usher-gateway")
    eventloop.run(serve(settings))


if __name__ == "__main__":
    main()
