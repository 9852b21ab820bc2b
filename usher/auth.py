"""Who is calling: bearer tokens in gRPC metadata → a principal (user, organization, roles).

Two kinds of credentials, both ``authorization: Bearer <credential>``:

* static API keys (``USHER_API_TOKENS="key=user@org[:role+role],..."``, or the same lines
  in the file named by ``USHER_API_TOKENS_FILE``, e.g. a mounted Kubernetes Secret);
* JWTs signed with HS256 (``USHER_JWT_SECRET``) or RS256 (``USHER_JWT_PUBLIC_KEY``, PEM
  text or a path), checked for expiry and, when set, ``USHER_JWT_AUDIENCE`` and
  ``USHER_JWT_ISSUER``. The user is ``sub``; the organization and roles come from the claims
  named by ``USHER_JWT_ORG_CLAIM`` (default ``org``) and ``USHER_JWT_ROLES_CLAIM``
  (default ``roles``).

The tenant of every request comes from here, never from a request body. Services call each
other with their own identity (a key or token with the ``service`` role).

**Open access** (``USHER_AUTH_OPEN=true``, off by default) is for one trusted machine, the
way Ollama itself works: a caller with no credentials is the tenant ``local/anonymous``,
and any key that isn't configured (the ``api_key="x"`` of every local-LLM tutorial) is a
tenant of its own, named by a digest of the key, so fairness between apps still holds.
Configured keys and JWTs keep their identities and roles; open callers are never admins.
With ``USHER_PRODUCTION=true`` open access is refused at start.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jwt
from pydantic import Field

from usher.config import ConfigError
from usher.errors import Unauthenticated
from usher.principals import ADMIN_ROLE, Principal
from usher.settings import UsherSettings

__all__ = [
    "ADMIN_ROLE",
    "OPEN_ORGANIZATION",
    "SERVICE_ROLE",
    "AuthSettings",
    "Authenticator",
    "JwtVerifier",
    "Principal",
    "load_token_map",
    "open_access_from_env",
    "open_principal",
    "parse_token_map",
]

#: The role of Usher's own services calling each other.
SERVICE_ROLE = "service"
#: The organization of callers admitted by open access (no key, or an unknown one).
OPEN_ORGANIZATION = "local"


class AuthSettings(UsherSettings):
    """The credentials every service and the gateway accept (see the module docstring)."""

    #: ``token=user@org[:role+role],...``
    api_tokens: str = ""
    #: The same lines in a file (e.g. a mounted Secret), added to ``api_tokens``.
    api_tokens_file: str = ""
    #: HS256 key; or ``jwt_public_key`` (RS256, PEM text or a path), not both.
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_org_claim: str = Field("org", min_length=1)
    jwt_roles_claim: str = Field("roles", min_length=1)
    #: Open access for one trusted machine; refused in production.
    auth_open: bool = False
    #: Production mode (usher.production): open access and weak secrets are refused.
    production: bool = False


def parse_token_map(spec: str) -> dict[str, Principal]:
    """Parse ``token=user@org[:role+role]`` entries separated by commas."""
    tokens: dict[str, Principal] = {}
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        token, sep, identity = entry.partition("=")
        who, _, roles = identity.partition(":")
        user, at, org = who.partition("@")
        if not sep or not at or not token or not user or not org:
            raise ConfigError(
                f"USHER_API_TOKENS entry {token[:4]}...: expected token=user@org[:roles]"
            )
        tokens[token] = Principal(user, org, frozenset(r for r in roles.split("+") if r))
    return tokens


def load_token_map(env: Mapping[str, str] | None = None) -> dict[str, Principal]:
    """API keys from USHER_API_TOKENS and the file named by USHER_API_TOKENS_FILE."""
    settings = AuthSettings.from_env(env)
    spec, path = settings.api_tokens, settings.api_tokens_file
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"USHER_API_TOKENS_FILE={path}: {exc.strerror}") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        spec = ",".join([spec, *lines]) if spec else ",".join(lines)
    return parse_token_map(spec)


@dataclass(frozen=True)
class JwtVerifier:
    """Checks a JWT's signature and claims and turns it into a principal."""

    key: str
    algorithm: str
    audience: str = ""
    issuer: str = ""
    org_claim: str = "org"
    roles_claim: str = "roles"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JwtVerifier | None:
        return cls.from_settings(AuthSettings.from_env(env))

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> JwtVerifier | None:
        """The verifier the settings describe; None without a JWT key."""
        secret, public = settings.jwt_secret, settings.jwt_public_key
        if secret and public:
            raise ConfigError(
                "set USHER_JWT_SECRET (HS256) or USHER_JWT_PUBLIC_KEY (RS256), not both"
            )
        if not secret and not public:
            return None
        if public and not public.lstrip().startswith("-----BEGIN"):
            try:
                public = Path(public).read_text()
            except OSError as exc:
                raise ConfigError(f"USHER_JWT_PUBLIC_KEY={public}: {exc.strerror}") from None
        return cls(
            key=secret or public,
            algorithm="HS256" if secret else "RS256",
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            org_claim=settings.jwt_org_claim,
            roles_claim=settings.jwt_roles_claim,
        )

    def verify(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience or None,
                issuer=self.issuer or None,
                options={"require": ["exp", "sub"], "verify_aud": bool(self.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        org = claims.get(self.org_claim)
        if not isinstance(org, str) or not org:
            raise Unauthenticated(f"token has no {self.org_claim!r} claim")
        roles = claims.get(self.roles_claim, [])
        if isinstance(roles, str):
            roles = roles.split()
        return Principal(str(claims["sub"]), org, frozenset(str(r) for r in roles))


class Authenticator:
    """Maps ``authorization: Bearer <credential>`` metadata to a principal."""

    def __init__(
        self,
        tokens: Mapping[str, Principal],
        jwt_verifier: JwtVerifier | None = None,
        *,
        open_access: bool = False,
    ) -> None:
        self._tokens = dict(tokens)
        self._jwt = jwt_verifier
        self.open_access = open_access

    @classmethod
    def from_env(
        cls, tokens: Mapping[str, Principal], env: Mapping[str, str] | None = None
    ) -> Authenticator:
        verifier = JwtVerifier.from_env(env)
        open_access = open_access_from_env(env)
        if not tokens and verifier is None and not open_access:
            raise ConfigError(
                "no credentials configured: set USHER_API_TOKENS(_FILE) or USHER_JWT_SECRET / "
                "USHER_JWT_PUBLIC_KEY (or USHER_AUTH_OPEN=true on a trusted machine), or no "
                "caller could authenticate"
            )
        return cls(tokens, verifier, open_access=open_access)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        header = _bearer(metadata or ())
        if header is None:
            if self.open_access:
                return Principal("anonymous", OPEN_ORGANIZATION)
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        for token, principal in self._tokens.items():
            if hmac.compare_digest(token.encode(), header.encode()):
                return principal
        if self._jwt is not None and header.count(".") == 2:
            return self._jwt.verify(header)
        if self.open_access:
            return open_principal(header)
        raise Unauthenticated("unknown token")


def open_access_from_env(env: Mapping[str, str] | None = None) -> bool:
    """USHER_AUTH_OPEN, refused when USHER_PRODUCTION is set."""
    settings = AuthSettings.from_env(env)
    if settings.auth_open and settings.production:
        raise ConfigError(
            "USHER_AUTH_OPEN=true admits anyone and is refused in production "
            "(USHER_PRODUCTION=true)"
        )
    return settings.auth_open


def open_principal(key: str) -> Principal:
    """The tenant of an unconfigured key under open access: its own, named by a digest so
    the key itself never appears in keys, logs or listings."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Principal(f"key-{digest}", OPEN_ORGANIZATION)


def _bearer(metadata: Iterable[tuple[str, str | bytes]] | Sequence[tuple[str, str]]) -> str | None:
    for key, value in metadata:
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
    return None
