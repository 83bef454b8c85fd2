"""The API key store: one Redis hash (`Keys.api_keys`) shared by every replica and the CLI.

Each entry is the key's public id (`Caller.key_id`, the first 16 hex digits of the secret's sha256)
-> an `ApiKey` as JSON: name, the full sha256 of the secret, scopes, limits, created, revoked. The
secret itself is shown once, by `create`, and never stored. A lookup hashes the presented secret,
reads the entry by its id prefix and compares the full hash in constant time.

Revoking keeps the entry (marked, with the time), so records that name the key id still resolve to a
name, and a revoked key stays refused rather than becoming unknown.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Iterable

import msgspec
import redis.asyncio as aioredis

from core.keys import Keys
from serve.caller import SCOPES, KeyLimits, key_id_of, secret_hash

SECRET_PREFIX = "sk-ss-"
"""What our keys start with, so they are recognisable in a leak scanner (like OpenAI's `sk-`)."""


class KeyStoreError(ValueError):
    """A key operation the caller got wrong (unknown scope, unknown id); the message says what to do."""


class ApiKey(msgspec.Struct, kw_only=True):
    """One API key as stored: never the secret, only its sha256."""

    id: str
    """Public id: first 16 hex digits of the secret's sha256 (what records store as `key`)."""
    name: str
    hash: str
    """sha256 of the secret, hex."""
    scopes: list[str]
    limits: KeyLimits = KeyLimits()
    created: float
    revoked: bool = False
    revoked_at: float | None = None
    local_admin: bool = False
    """The credential serve generates into var/admin.key: it does not close the anonymous local mode."""

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(self.hash, secret_hash(secret))


_DECODER = msgspec.json.Decoder(ApiKey)


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, validated and in canonical order; a `KeyStoreError` naming the bad one otherwise."""
    given = [s.strip() for s in scopes if s.strip()]
    unknown = [s for s in given if s not in SCOPES]
    if unknown or not given:
        raise KeyStoreError(
            f"scopes: expected a comma-separated subset of {','.join(SCOPES)} (got {','.join(given) or 'nothing'})"
        )
    return [s for s in SCOPES if s in given]


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def create(
        self, name: str, scopes: Iterable[str], limits: KeyLimits | None = None, *, local_admin: bool = False
    ) -> tuple[str, ApiKey]:
        """A new key: returns the secret (shown once, never stored) and its stored entry."""
        scopes = check_scopes(scopes)
        while True:
            secret = new_secret()
            entry = await self.add(secret, name, scopes, limits, local_admin=local_admin)
            if entry is not None:
                return secret, entry
            # Two secrets with the same 64-bit id prefix: astronomically rare, but never overwrite a key.

    async def add(
        self,
        secret: str,
        name: str,
        scopes: Iterable[str],
        limits: KeyLimits | None = None,
        *,
        local_admin: bool = False,
    ) -> ApiKey | None:
        """Store a key for `secret`; None when its id is taken already."""
        entry = ApiKey(
            id=key_id_of(secret),
            name=name,
            hash=secret_hash(secret),
            scopes=check_scopes(scopes),
            limits=limits or KeyLimits(),
            created=time.time(),
            local_admin=local_admin,
        )
        added = await self.client.hsetnx(self.keys.api_keys, entry.id, msgspec.json.encode(entry))
        return entry if added else None

    async def get(self, key_id: str) -> ApiKey | None:
        raw = await self.client.hget(self.keys.api_keys, key_id)
        return None if raw is None else _DECODER.decode(raw)

    async def find(self, secret: str) -> ApiKey | None:
        """The entry of a presented secret (revoked or not); None if no key has that secret."""
        entry = await self.get(key_id_of(secret))
        return entry if entry is not None and entry.matches(secret) else None

    async def list(self) -> list[ApiKey]:
        raw = await self.client.hgetall(self.keys.api_keys)
        return sorted((_DECODER.decode(v) for v in raw.values()), key=lambda e: e.created)

    async def has_operator_keys(self) -> bool:
        """Whether any key was created with `secondstage keys create` (revoked ones count: see docs/security.md)."""
        return any(not e.local_admin for e in await self.list())

    async def revoke(self, key_id: str) -> ApiKey:
        entry = await self.get(key_id)
        if entry is None:
            raise KeyStoreError(f"no API key with id {key_id!r}; `secondstage keys list` shows the ids")
        if not entry.revoked:
            entry = msgspec.structs.replace(entry, revoked=True, revoked_at=time.time())
            await self.client.hset(self.keys.api_keys, key_id, msgspec.json.encode(entry))
        return entry
