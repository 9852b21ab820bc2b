"""Write an overlay's secret env files with fresh random values (never committed).

    python3 deploy/tools/make_secrets.py deploy/k8s/overlays/example [--force]

Creates OVERLAY/secrets/usher-secrets.env (an admin API key, the services' token, the
gateway's watch-token key) and
OVERLAY/secrets/usher-redis.env (the Redis password and the URL carrying it), mode 0600,
which the overlay's secretGenerator turns into the Secrets `usher-secrets` and
`usher-redis` (a content hash in their names: a changed secret rolls the pods). Existing
files are kept unless --force. Every value is 43 random URL-safe characters, well above
what production mode (usher/production.py) requires. Add more keys to the files by hand
(users' API keys, USHER_JWT_*, USHER_ENCRYPTION_KEYS, provider keys).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

__all__ = ["main", "secret_files"]


def secret_files(admin: str = "admin@example", external_redis: str = "") -> dict[str, str]:
    """File name -> contents, with new random values. ``external_redis`` (host:port) makes a
    TLS URL with the ACL user `usher` instead of the in-cluster Redis's."""
    admin_key, service_key, password, watch = (secrets.token_urlsafe(32) for _ in range(4))
    url = (
        f"rediss://usher:{password}@{external_redis}/0"
        if external_redis
        else f"redis://:{password}@usher-redis:6379/0"
    )
    return {
        "usher-secrets.env": (
            "# API keys: key=user@org[:roles], comma-separated (deploy/README.md, Secrets).\n"
            f"USHER_API_TOKENS={admin_key}={admin}:admin,{service_key}=scheduler@usher:service\n"
            f"USHER_SERVICE_TOKEN={service_key}\n"
            "# Signs the gateway's watch tokens: the same on every replica.\n"
            f"USHER_GATEWAY_WATCH_SECRET={watch}\n"
        ),
        "usher-redis.env": f"REDIS_PASSWORD={password}\nUSHER_REDIS_URL={url}\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("overlay", type=Path)
    parser.add_argument("--admin", default="admin@example", help="user@org of the admin key")
    parser.add_argument("--force", action="store_true", help="replace existing files")
    parser.add_argument(
        "--external-redis", default="", metavar="HOST:PORT", help="a managed Redis (TLS)"
    )
    args = parser.parse_args(argv)
    folder: Path = args.overlay / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in secret_files(args.admin, args.external_redis).items():
        path = folder / name
        if path.exists() and not args.force:
            print(f"kept {path} (--force replaces it)")
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
