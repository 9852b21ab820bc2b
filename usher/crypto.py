"""Prompts and results encrypted at rest in Redis (AES-256-GCM), with key rotation.

Keys come from ``USHER_ENCRYPTION_KEYS="kid1:<base64 32 bytes>,kid2:<...>"`` (typically a
mounted Secret); new data is sealed with ``USHER_ENCRYPTION_KEY_ID`` (default: the first
key), and any listed key opens data sealed with it, so rotating is: add the new key, make it
active, and drop the old one once its data has expired. Scheduling metadata (states,
positions, tenants, scores) stays clear so scripts can work on it. Each ciphertext is bound
to its request id (associated data), so one request's payload cannot be swapped into
another's. Without keys, a NullSealer stores data as is.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from usher.config import ConfigError
from usher.settings import UsherSettings

__all__ = ["EncryptionSettings", "NullSealer", "Sealer", "sealer_from_env"]

_MAGIC = b"ug1"
_TEXT_PREFIX = "enc:"


class NullSealer:
    """No encryption configured: data passes through unchanged."""

    def seal(self, data: bytes, request_id: str) -> bytes:
        return data

    def open(self, data: bytes, request_id: str) -> bytes:
        return data

    def seal_text(self, text: str, request_id: str) -> str:
        return text

    def open_text(self, text: str, request_id: str) -> str:
        return text


class Sealer(NullSealer):
    def __init__(self, keys: Mapping[str, bytes], active: str) -> None:
        if active not in keys:
            raise ConfigError(
                f"USHER_ENCRYPTION_KEY_ID={active!r} is not among USHER_ENCRYPTION_KEYS"
            )
        self._keys = {kid: AESGCM(key) for kid, key in keys.items()}
        self._active = active

    def seal(self, data: bytes, request_id: str) -> bytes:
        nonce = os.urandom(12)
        kid = self._active.encode()
        sealed = self._keys[self._active].encrypt(nonce, data, request_id.encode())
        return _MAGIC + bytes([len(kid)]) + kid + nonce + sealed

    def open(self, data: bytes, request_id: str) -> bytes:
        if not data.startswith(_MAGIC):
            return data  # written before encryption was turned on
        size = data[len(_MAGIC)]
        start = len(_MAGIC) + 1
        kid = data[start : start + size].decode()
        nonce = data[start + size : start + size + 12]
        key = self._keys.get(kid)
        if key is None:
            raise ValueError(f"data sealed with key {kid!r}, which is no longer configured")
        return key.decrypt(nonce, data[start + size + 12 :], request_id.encode())

    def seal_text(self, text: str, request_id: str) -> str:
        return _TEXT_PREFIX + base64.b64encode(self.seal(text.encode(), request_id)).decode()

    def open_text(self, text: str, request_id: str) -> str:
        if not text.startswith(_TEXT_PREFIX):
            return text
        return self.open(base64.b64decode(text[len(_TEXT_PREFIX) :]), request_id).decode()


class EncryptionSettings(UsherSettings):
    """Keys that seal prompts and results at rest; none = stored in the clear."""

    #: ``kid:<base64 of 32 bytes>,...``; every key opens, the active one seals.
    encryption_keys: str = ""
    #: The kid that seals; the first key's when empty.
    encryption_key_id: str = ""


def sealer_from_env(env: Mapping[str, str] | None = None) -> NullSealer:
    settings = EncryptionSettings.from_env(env)
    spec = settings.encryption_keys
    if not spec:
        return NullSealer()
    keys: dict[str, bytes] = {}
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        kid, sep, encoded = entry.partition(":")
        try:
            key = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not sep or not kid or len(key) != 32:
            raise ConfigError(
                f"USHER_ENCRYPTION_KEYS entry {kid or '?'!r}: expected kid:<base64 of 32 bytes>"
            )
        keys[kid] = key
    return Sealer(keys, settings.encryption_key_id or next(iter(keys)))
