"""Per-key rate limits shared by every replica through Redis: requests, tokens and feedback per minute, concurrency.

The windows are the `limits` library's, on its Redis storage (redis-py's asyncio client,
the one serve already uses), under the deployment's prefix (`Keys.rate_limits`):

- requests/min (chat, completions) and feedback/min: a **moving window** — exact (no
  double burst across a window edge, as fixed windows allow) and a refused request consumes
  nothing. It stores one list entry per request, which is cheap at request rates.
- tokens/min: a **sliding window counter** — two counters per key, O(1) whatever the rate
  (a moving window would store one entry per token). It weighs the previous minute by how
  much of it still overlaps, so it is an approximation of a true minute, never a 2× burst.

The token rule is OpenAI's: before the engine runs, a request is charged its prompt tokens
plus its whole completion budget (`n` × `max_tokens`, or the room left in the context when
`max_tokens` is not set) and admitted only if all of it fits. What a key's requests generate
therefore never exceeds its cap, on any number of replicas; unused budget is not given back,
so clients should set `max_tokens` near what they expect.

Concurrency is a lease per request in a Redis sorted set per key (member = lease id, score =
expiry, Redis' clock), taken and checked in one Lua script: a replica that crashes mid-request
leaves leases that expire after `lease_s`; a live replica renews the leases it holds. The
lease is given back when the request ends, however it ends (the dependency's exit, which
FastAPI runs after a streamed response has finished or its client has gone).

Redis down or slow → the limits **fail open**: the request is served, the failure logged and
counted in `secondstage_rate_limit_errors_total`; chat does not depend on the limiter's store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from serve.caller import Caller, KeyLimits
from serve.errors import RateLimited

if TYPE_CHECKING:
    from starlette.responses import Response

    from core.keys import Keys
    from serve.metrics import Metrics
    from serve.services.generation import Job

logger = logging.getLogger("secondstage.limits")

ANONYMOUS = "anonymous"
"""The identity of callers without an API key (the open local mode); its limits are settings."""

_STORE_ERRORS = (StorageError, RedisError, OSError, asyncio.TimeoutError)

# Take a lease if the key holds fewer than the limit, after dropping the expired ones (crashed replicas').
_ACQUIRE = """
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
if redis.call('zcard', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('zadd', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('pexpire', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# Push the expiry of leases still held (XX: a lease already given back or expired stays gone).
_RENEW = """
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
for i = 2, #ARGV do
  redis.call('zadd', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('pexpire', KEYS[1], tonumber(ARGV[1]))
return 1
"""


def storage_uri(redis_url: str) -> str:
    """The `limits` storage URI for a redis-py URL (`unix:///s.sock` → `async+redis+unix:///s.sock`)."""
    scheme, sep, rest = redis_url.partition("://")
    if not sep:
        raise ValueError(f"not a Redis URL: {redis_url!r}")
    return f"async+redis+unix://{rest}" if scheme == "unix" else f"async+{scheme}://{rest}"


def token_budget(jobs: Iterable[Job]) -> int:
    """Tokens a request is charged: prompt + n × completion budget per engine request; 0 for a policy refusal."""
    total = 0
    for job in jobs:
        if job.refusal is None and job.params is not None:
            total += len(job.prompt_ids) + job.request.n * int(job.params.max_tokens)
    return total


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it (Go's duration format): `20ms`, `1.5s`, `6m0s`."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass
class Admission:
    """One request's hold on its key's limits: the headers to send, and the concurrency lease to give back."""

    limiter: RateLimiter | None
    identity: str
    limits: KeyLimits
    headers: dict[str, str] = field(default_factory=dict)
    lease: str | None = None
    response: Response | None = None
    """The response the route's result is rendered into, when the route returns a model (not a stream)."""

    def add_headers(self, headers: dict[str, str]) -> None:
        self.headers.update(headers)
        if self.response is not None:
            self.response.headers.update(headers)

    async def charge_tokens(self, jobs: Iterable[Job]) -> None:
        """Charge the prepared request's token budget; RateLimited when it does not fit the key's tokens/min."""
        if self.limiter is not None and self.limits.tpm is not None:
            await self.limiter.charge(self, "tokens", self.limits.tpm, token_budget(jobs))

    def apply(self, response: Response) -> Response:
        """Put the x-ratelimit-* headers on a response the route builds itself (a stream)."""
        response.headers.update(self.headers)
        return response

    async def release(self) -> None:
        if self.limiter is not None and self.lease is not None:
            lease, self.lease = self.lease, None
            await self.limiter.give_back(self.identity, lease)


class RateLimiter:
    """Checks and counts one identity's use against its `KeyLimits`, in the Redis every replica shares."""

    def __init__(
        self,
        redis_url: str,
        keys: Keys,
        metrics: Metrics,
        *,
        anonymous: KeyLimits | None = None,
        lease_s: float = 30.0,
        timeout_s: float = 2.0,
    ) -> None:
        self.keys = keys
        self.metrics = metrics
        self.anonymous = anonymous or KeyLimits()
        self.lease_ms = max(1000, int(lease_s * 1000))
        options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        storage = RedisStorage(
            storage_uri(redis_url),
            implementation="redispy",
            key_prefix=keys.rate_limits,
            wrap_exceptions=True,
            **options,
        )
        self._windows = MovingWindowRateLimiter(storage)
        self._tokens = SlidingWindowCounterRateLimiter(storage)
        self._redis = aioredis.Redis.from_url(redis_url, **options)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # identity -> leases this replica holds
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_forever(), name="rate-limit-leases")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self._redis.aclose()

    def limits_for(self, caller: Caller) -> tuple[str, KeyLimits]:
        """The identity limits are counted under, and its limits: the key's own, or the anonymous settings."""
        if caller.key_id is None:
            return ANONYMOUS, self.anonymous
        return caller.key_id, caller.limits

    async def admit(self, caller: Caller, *, kind: str) -> Admission:
        """Admit one request of `kind` ("requests" or "feedback") or raise RateLimited.

        Requests take a concurrency lease first, then a request from the window (a request the
        lease refuses consumes nothing of the window; one the window refuses gives its lease back).
        """
        identity, limits = self.limits_for(caller)
        admission = Admission(self, identity, limits)
        if kind == "requests":
            if limits.max_concurrency is not None:
                await self._take_lease(admission, limits.max_concurrency)
            if limits.rpm is not None:
                try:
                    await self.charge(admission, "requests", limits.rpm, 1)
                except RateLimited:
                    await admission.release()
                    raise
        elif kind == "feedback" and limits.feedback_per_min is not None:
            await self.charge(admission, "feedback", limits.feedback_per_min, 1)
        return admission

    async def charge(self, admission: Admission, limit: str, per_minute: int, cost: int) -> None:
        """Consume `cost` from the identity's `limit` window; RateLimited (nothing consumed) when it does not fit."""
        item = RateLimitItemPerMinute(per_minute, namespace=limit)
        strategy = self._tokens if limit == "tokens" else self._windows
        try:
            allowed = cost <= 0 or await strategy.hit(item, admission.identity, cost=cost)
            reset, remaining = await strategy.get_window_stats(item, admission.identity)
        except _STORE_ERRORS as exc:
            self._failed_open(f"{limit}/min", exc)
            return
        wait = max(0.0, reset - time.time())
        admission.add_headers(
            {
                f"x-ratelimit-limit-{limit}": str(per_minute),
                f"x-ratelimit-remaining-{limit}": str(max(0, remaining)),
                f"x-ratelimit-reset-{limit}": duration(wait),
            }
        )
        if allowed:
            return
        self.metrics.rate_limited.labels(limit).inc()
        if cost > per_minute:
            message = (
                f"This request needs {cost} tokens (prompt + n × max_tokens), more than this key's whole limit of "
                f"{per_minute} tokens per minute; lower max_tokens or n, or shorten the prompt."
            )
            raise RateLimited(message, limit=limit, retry_after_s=60.0, headers=admission.headers)
        message = (
            f"Rate limit reached on {limit} per minute: limit {per_minute}, remaining {max(0, remaining)}, "
            f"requested {cost}. Please try again in {duration(wait)}."
        )
        raise RateLimited(message, limit=limit, retry_after_s=wait, headers=admission.headers)

    async def _take_lease(self, admission: Admission, max_concurrency: int) -> None:
        lease = uuid.uuid4().hex
        key = self._leases_key(admission.identity)
        try:
            taken = await self._acquire(keys=[key], args=[max_concurrency, self.lease_ms, lease])
        except _STORE_ERRORS as exc:
            self._failed_open("concurrency", exc)
            return
        if not taken:
            self.metrics.rate_limited.labels("concurrency").inc()
            raise RateLimited(
                f"Too many requests in flight for this key: the limit is {max_concurrency} at once. "
                "Wait for one to finish, then retry.",
                limit="concurrency",
                retry_after_s=1.0,
                headers=admission.headers,
            )
        admission.lease = lease
        self._held.setdefault(admission.identity, set()).add(lease)

    def _leases_key(self, identity: str) -> str:
        return f"{self.keys.rate_limits}:inflight:{identity}"

    async def give_back(self, identity: str, lease: str) -> None:
        held = self._held.get(identity)
        if held is not None:
            held.discard(lease)
            if not held:
                del self._held[identity]
        try:
            await self._redis.zrem(self._leases_key(identity), lease)
        except _STORE_ERRORS as exc:
            # The lease expires by itself after lease_s; until then it counts against the key.
            self._failed_open("concurrency release", exc)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            for identity, leases in list(self._held.items()):
                if not leases:
                    continue
                try:
                    await self._renew(keys=[self._leases_key(identity)], args=[self.lease_ms, *leases])
                except _STORE_ERRORS as exc:
                    self._failed_open("concurrency renewal", exc)

    def _failed_open(self, what: str, exc: BaseException) -> None:
        self.metrics.rate_limit_errors.inc()
        logger.warning("rate limits: %s not checked, Redis did not answer (%s); the request goes on", what, exc)
