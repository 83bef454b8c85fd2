"""Who is asking: the identity a request carries, resolved once by the `CallerDep` dependency."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass
class Caller:
    """The API key (hashed before it is stored) and the `user` field."""

    api_key: str | None = None
    user: str | None = None

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16] if self.api_key else None
