"""API keys: generated once, stored only as SHA-256 hashes, each bound to one tenant.

Keys are 256-bit random tokens, so a plain SHA-256 is enough to make a stolen database useless
(no salt or slow hash is needed against guessing a random 256-bit value).
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import threading
import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shears.db.tables import ApiKey, new_id, utcnow

KEY_PREFIX = "shk_"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
DEFAULT_TENANT = "default"


class InvalidKeySpec(ValueError):
    """SHEARS_API_KEYS or a tenant name is malformed."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_tenant(tenant: str) -> str:
    # Tenant names become storage path components: keep them to a safe alphabet.
    if not TENANT_PATTERN.match(tenant):
        raise InvalidKeySpec(
            f"tenant {tenant!r} must be 1-64 characters of a-z, 0-9, '-' or '_', starting with a "
            "letter or digit"
        )
    return tenant


def parse_env_keys(value: str) -> dict[str, str]:
    """``"tenant:key,tenant2:key2"`` -> {key hash: tenant}."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep or not key:
            raise InvalidKeySpec("SHEARS_API_KEYS must look like 'tenant:key,tenant2:key2'")
        keys[hash_key(key)] = check_tenant(tenant)
    return keys


def create_key(session: Session, tenant: str) -> tuple[ApiKey, str]:
    """A new key for ``tenant``; the plain key is returned once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"),
        tenant=check_tenant(tenant),
        key_hash=hash_key(key),
        prefix=key[:10],
        created_at=utcnow(),
    )
    session.add(row)
    return row, key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_key(session: Session, key_id: str) -> bool:
    row = session.get(ApiKey, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def any_active_key(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


class KeyCheck(enum.Enum):
    """Why a request has no tenant."""

    MISSING = "missing"  # auth is on and the request sent no key
    INVALID = "invalid"  # the key is unknown or revoked


class KeyResolver:
    """Resolves API keys to tenants, remembering database answers for ``ttl_seconds``.

    A status poll then costs no key query (``peek`` answers from memory, without a session); a
    key created or revoked with the CLI takes effect within ``ttl_seconds`` in every API process.
    """

    def __init__(self, env_keys: dict[str, str], ttl_seconds: float = 1.0) -> None:
        self.env_keys = env_keys
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._enabled: tuple[float, bool] | None = None
        self._tenants: dict[str, tuple[float, str | None]] = {}

    def peek(self, key: str | None) -> str | KeyCheck | None:
        """The caller's tenant (or why there is none) from memory alone; None when that needs
        the database (call ``check``)."""
        now = time.monotonic()
        if not self.env_keys:
            enabled = self._enabled
            if enabled is None or now - enabled[0] >= self.ttl:
                return None
            if not enabled[1]:
                return DEFAULT_TENANT
        if key is None:
            return KeyCheck.MISSING
        digest = hash_key(key)
        if digest in self.env_keys:
            return self.env_keys[digest]
        cached = self._tenants.get(digest)
        if cached is None or now - cached[0] >= self.ttl:
            return None
        return cached[1] if cached[1] is not None else KeyCheck.INVALID

    def check(self, sessions: sessionmaker[Session], key: str | None) -> str | KeyCheck:
        """Like ``peek``, asking the database where memory has no fresh answer."""
        with sessions() as session:
            if not self.auth_enabled(session):
                return DEFAULT_TENANT
            if key is None:
                return KeyCheck.MISSING
            tenant = self.tenant(session, key)
        return tenant if tenant is not None else KeyCheck.INVALID

    def auth_enabled(self, session: Session) -> bool:
        if self.env_keys:
            return True
        now = time.monotonic()
        cached = self._enabled
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        enabled = any_active_key(session)
        self._enabled = (now, enabled)
        return enabled

    def tenant(self, session: Session, key: str) -> str | None:
        digest = hash_key(key)
        if digest in self.env_keys:
            return self.env_keys[digest]
        now = time.monotonic()
        cached = self._tenants.get(digest)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        tenant = session.scalar(
            select(ApiKey.tenant).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        )
        with self._lock:
            if len(self._tenants) > 10_000:  # unknown keys must not grow this without bound
                self._tenants.clear()
            self._tenants[digest] = (now, tenant)
        return tenant
