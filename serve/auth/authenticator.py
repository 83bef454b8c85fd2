"""A request's Bearer key -> `Caller`, checked against the key store with a short in-process cache.

Every route resolves its caller here (through `serve.deps`): a missing, unknown or revoked key is a
401 `invalid_api_key`, a key without the route's scope a 403 naming the scope.

**Cache.** Lookups (hits and misses) are kept `cache_s` seconds (2 s by default), so a busy key costs
one Redis round trip per replica every couple of seconds rather than one per request, and a revoke
reaches every replica within `cache_s`. While Redis cannot be reached, the last answer seen for a key is
used (chat goes on with the keys it knew); a key never seen before is then a 503.

**Anonymous mode.** With no operator-created key in the store and either a loopback bind or
`--allow-anonymous`, a request without a key (or with one the store does not know, as OpenAI clients
always send something) is an anonymous caller with the `chat` and `feedback` scopes, as vLLM's server
without `--api-key`. Admin routes always need an admin key. Once a key exists, every route needs one.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis

from serve.auth.store import ApiKey, KeyStore
from serve.caller import Caller, secret_hash
from serve.errors import Forbidden, Unauthorized, Unavailable

logger = logging.getLogger("secondstage.auth")

ANONYMOUS_SCOPES = frozenset({"chat", "feedback"})
_REDIS_ERRORS = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve to anything


class Authenticator:
    def __init__(
        self,
        store: KeyStore,
        *,
        anonymous_allowed: bool,
        cache_s: float = 2.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`anonymous_allowed`: the bind is loopback or the operator said --allow-anonymous."""
        self.store = store
        self.anonymous_allowed = anonymous_allowed
        self.cache_s = cache_s
        self.clock = clock
        # sha256 of a presented secret -> (valid until, entry or None): hashes, not secrets, stay in memory.
        self._keys: OrderedDict[str, tuple[float, ApiKey | None]] = OrderedDict()
        self._max_cached = max_cached
        # Whether operator keys exist; None until Redis answered once. Unknown counts as "none" where anonymous
        # use is allowed anyway (loopback, --allow-anonymous): a local server whose Redis will not start keeps
        # serving chat, as it did before keys existed; a network bind without the flag stays closed.
        self._has_keys: tuple[float, bool | None] = (float("-inf"), None)

    async def open_mode(self) -> bool:
        """Whether key-less requests are served now (no operator keys, and a loopback bind or --allow-anonymous)."""
        if not self.anonymous_allowed:
            return False
        until, has_keys = self._has_keys
        if self.clock() >= until:
            try:
                has_keys = await self.store.has_operator_keys()
                self._has_keys = (self.clock() + self.cache_s, has_keys)
            except _REDIS_ERRORS as exc:
                logger.warning("cannot read the API keys from Redis (%s); using what was known", exc)
                self._has_keys = (self.clock() + self.cache_s, has_keys)  # ask again later, not per request
        return not has_keys

    async def caller(self, secret: str | None, *, user: str | None = None) -> Caller:
        """The caller a request's key stands for; `Unauthorized` for a missing, unknown or revoked key."""
        entry = None
        if secret:
            try:
                entry = await self._lookup(secret)
            except Unavailable:
                if not await self.open_mode():
                    raise
        if entry is not None:
            if entry.revoked:
                raise Unauthorized(f"API key {entry.id} was revoked; ask the operator for a new one")
            scopes = frozenset(entry.scopes)
            if await self.open_mode():
                scopes |= ANONYMOUS_SCOPES
            return Caller(api_key=secret, user=user, scopes=scopes, limits=entry.limits, name=entry.name)
        if await self.open_mode():
            return Caller(user=user, scopes=ANONYMOUS_SCOPES)
        if not secret:
            raise Unauthorized(
                "no API key: send `Authorization: Bearer <key>` "
                "(an operator creates keys with `secondstage keys create`)"
            )
        raise Unauthorized("incorrect API key provided; check it, or ask the operator for one")

    async def _lookup(self, secret: str) -> ApiKey | None:
        digest = secret_hash(secret)
        cached = self._keys.get(digest)
        if cached is not None and self.clock() < cached[0]:
            return cached[1]
        try:
            entry = await self.store.find(secret)
        except _REDIS_ERRORS as exc:
            if cached is not None:
                return cached[1]
            raise Unavailable(f"cannot check the API key now: Redis is unreachable ({exc}); retry shortly") from exc
        self._keys[digest] = (self.clock() + self.cache_s, entry)
        self._keys.move_to_end(digest)
        if len(self._keys) > self._max_cached:
            self._keys.popitem(last=False)
        return entry


def require(caller: Caller, scope: str) -> None:
    """Refuse a caller without `scope` (403): anonymous callers are told to bring a key instead (401)."""
    if scope in caller.scopes:
        return
    if caller.api_key is None:
        raise Unauthorized(
            f"this route needs an API key with the `{scope}` scope; send `Authorization: Bearer <key>`"
            + (" (the local admin key is in var/admin.key)" if scope == "admin" else "")
        )
    raise Forbidden(f"API key {caller.key_id} lacks the `{scope}` scope this route needs")
