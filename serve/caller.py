"""Who is asking: the identity a request carries, resolved once by the `CallerDep` dependency.

The identity comes from the API key (never from the request body): `key_id` is the key's public
id, the one completion and feedback records store and that ownership, policy scopes, per-identity
caps and rate limits key on. The body's `user` field is metadata only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec


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
    """The API key (hashed before it is stored), its scopes and limits, and the `user` field."""

    api_key: str | None = None
    user: str | None = None
    scopes: frozenset[str] = field(default_factory=frozenset)
    limits: KeyLimits = field(default_factory=KeyLimits)

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16] if self.api_key else None
