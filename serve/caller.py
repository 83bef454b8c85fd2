"""Who is asking: the identity a request carries, resolved once by the `CallerDep` dependency.

The identity comes from the API key (never from the request body): `key_id` is the key's public
id, the one completion and feedback records store and that ownership, policy scopes, per-identity
caps and rate limits key on. The body's `user` field is metadata only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

SCOPES = ("chat", "feedback", "admin")
"""What a key may do: `chat` (chat, completions, models, tokenize), `feedback`, `admin` (/admin/*)."""


def secret_hash(secret: str) -> str:
    """The sha256 of an API key, hex: what the key store keeps instead of the key.

    A plain fast hash is enough here (no salt, no bcrypt/argon2): our keys are 32 random bytes from
    `secrets`, so there is no dictionary to try and 2^256 guesses to make; slow hashes exist for
    low-entropy passwords. A fast hash also lets every request be checked without a CPU cost.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id_of(secret: str) -> str:
    """The key's public id: the first 16 hex digits of its sha256 (what records store as `key`)."""
    return secret_hash(secret)[:16]


class KeyLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-key limits, enforced across replicas through Redis; None means no limit."""

    rpm: int | None = None
    """Requests per minute (chat, completions)."""
    tpm: int | None = None
    """Tokens per minute (prompt + completion)."""
    feedback_per_min: int | None = None
    """Feedback events per minute."""
    max_concurrency: int | None = None
    """Requests in flight at once."""


@dataclass
class Caller:
    """The API key (hashed before it is stored), its name, scopes and limits, and the `user` field.

    `api_key` is None for an anonymous caller (a loopback server with no keys, or `--allow-anonymous`).
    """

    api_key: str | None = None
    user: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    limits: KeyLimits = field(default_factory=KeyLimits)
    name: str | None = None
    """The key's name (`secondstage keys create --name`), set by the operator: what policy `users` globs match."""

    @property
    def key_id(self) -> str | None:
        return key_id_of(self.api_key) if self.api_key else None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes
