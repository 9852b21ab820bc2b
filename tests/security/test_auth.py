"""Authentication: API keys and JWTs (HS256, RS256) become principals; anything else is refused."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from usher.auth import Authenticator, JwtVerifier, Principal, load_token_map
from usher.config import ConfigError
from usher.errors import Unauthenticated


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def hs256(secret: str = "a-long-enough-test-secret-of-32-bytes!", **claims: object) -> str:
    body = {"sub": "alice", "org": "acme", "roles": ["admin"], "exp": time.time() + 60, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def test_api_keys_from_env_and_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "tokens"
    secret.write_text("# mounted from a Secret\nfile-key=bob@globex:service\n")
    tokens = load_token_map(
        {"USHER_API_TOKENS": "env-key=alice@acme", "USHER_API_TOKENS_FILE": str(secret)}
    )
    auth = Authenticator(tokens)
    assert auth.authenticate(bearer("env-key")) == Principal("alice", "acme")
    assert auth.authenticate(bearer("file-key")).roles == frozenset({"service"})
    with pytest.raises(Unauthenticated, match="unknown token"):
        auth.authenticate(bearer("nope"))
    with pytest.raises(Unauthenticated, match="missing"):
        auth.authenticate([])


def test_hs256_tokens() -> None:
    verifier = JwtVerifier.from_env(
        {
            "USHER_JWT_SECRET": "a-long-enough-test-secret-of-32-bytes!",
            "USHER_JWT_AUDIENCE": "usher",
        }
    )
    assert verifier is not None
    auth = Authenticator({}, verifier)
    principal = auth.authenticate(bearer(hs256(aud="usher")))
    assert (principal.user, principal.organization, principal.is_admin) == ("alice", "acme", True)
    with pytest.raises(Unauthenticated, match="expired"):
        auth.authenticate(bearer(hs256(aud="usher", exp=time.time() - 10)))
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.authenticate(bearer(hs256("a-different-secret-also-32-bytes-long", aud="usher")))
    with pytest.raises(Unauthenticated, match="invalid token"):
        auth.authenticate(bearer(hs256(aud="someone-else")))
    with pytest.raises(Unauthenticated, match="'org'"):
        auth.authenticate(bearer(hs256(aud="usher", org="")))


def test_rs256_tokens_with_a_public_key_file(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp_path / "jwt.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    verifier = JwtVerifier.from_env({"USHER_JWT_PUBLIC_KEY": str(public)})
    assert verifier is not None and verifier.algorithm == "RS256"
    token = jwt.encode(
        {"sub": "svc", "org": "usher", "roles": "service", "exp": time.time() + 60},
        key,
        algorithm="RS256",
    )
    assert Authenticator({}, verifier).authenticate(bearer(token)).roles == frozenset({"service"})


def test_some_credential_must_be_configured() -> None:
    with pytest.raises(ConfigError, match="no credentials"):
        Authenticator.from_env({}, {})
    with pytest.raises(ConfigError, match="not both"):
        JwtVerifier.from_env({"USHER_JWT_SECRET": "a", "USHER_JWT_PUBLIC_KEY": "-----BEGIN x"})


def test_open_access_admits_anyone_as_a_local_tenant_of_its_own_but_never_an_admin() -> None:
    tokens = load_token_map({"USHER_API_TOKENS": "admin-key=ops@usher:admin"})
    auth = Authenticator.from_env(tokens, {"USHER_AUTH_OPEN": "true"})
    assert auth.authenticate([]) == Principal("anonymous", "local")
    app_one, app_two = auth.authenticate(bearer("x")), auth.authenticate(bearer("sk-other"))
    assert app_one != app_two  # each placeholder key is its own tenant: fairness holds
    assert app_one == auth.authenticate(bearer("x"))
    assert "x" not in app_one.user and not app_one.is_admin
    assert auth.authenticate(bearer("admin-key")).is_admin  # configured keys keep their roles


def test_open_access_is_explicit_and_refused_in_production() -> None:
    with pytest.raises(ConfigError, match="USHER_AUTH_OPEN"):
        Authenticator.from_env({}, {})
    with pytest.raises(ConfigError, match="production"):
        Authenticator.from_env({}, {"USHER_AUTH_OPEN": "1", "USHER_PRODUCTION": "true"})
    strict = Authenticator.from_env(load_token_map({"USHER_API_TOKENS": "k=a@b"}), {})
    with pytest.raises(Unauthenticated):
        strict.authenticate(bearer("x"))
