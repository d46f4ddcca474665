"""App API keys: an app is known by the SHA-256 of its key; the key itself is never stored."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from edge_agent.config import AppConfig
from edge_agent.errors import invalid_api_key, missing_api_key

KEY_PREFIX = "sk-sovra-"


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> tuple[str, str]:
    """A new key and the sha256 hex to put in the config (``[[apps]] key_sha256``)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_api_key(key)


class ApiKeys:
    """Maps an ``Authorization`` header to the app it belongs to."""

    def __init__(self, apps: Sequence[AppConfig]) -> None:
        self._apps = tuple(apps)

    def authenticate(self, authorization: str | None) -> AppConfig:
        """The app named by a ``Bearer`` key; :class:`ApiError` 401 when missing or wrong."""
        key = _bearer(authorization)
        if key is None:
            raise missing_api_key()
        digest = hash_api_key(key).encode()
        found: AppConfig | None = None
        # Compare against every app, in constant time each, so timing does not tell which
        # app (or how much of a hash) matched.
        for app in self._apps:
            if hmac.compare_digest(digest, app.key_sha256.encode()):
                found = app
        if found is None:
            raise invalid_api_key()
        return found


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value:
        return None
    return value
