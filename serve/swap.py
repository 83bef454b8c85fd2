"""Hot-swap: follow the active model version in Redis and activate it in the running engine.

Events on the pub/sub channel give speed; a periodic read of the active-version key
gives correctness (pub/sub drops messages while disconnected). A version that fails
to load is logged and counted, and the server keeps serving the one it had; it is tried again
after `retry_initial_s`, doubling per failure up to `retry_max_s` (an event announcing a version
tries at once). Meanwhile the replica is skewed: `wanted` (the active version in Redis) differs
from what it serves, and /health, /v1/models and `secondstage_version_skew` say so.

Whatever Redis holds is checked before it is loaded: the name must be `base` or v<number>
(`core.versions.check_name`) and be registered in the versions hash, and its directory must
stay under the versions root (checked by `ModelEngine.activate`). A refused name is logged and
counted as `secondstage_swaps_total{result="rejected"}`, once until it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from core.keys import Keys
from core.versions import BASE, VersionError, check_name

if TYPE_CHECKING:
    from serve.engine import ModelEngine

logger = logging.getLogger("secondstage.swap")


class VersionWatcher:
    def __init__(
        self,
        engine: ModelEngine,
        client_factory: Callable[[], aioredis.Redis],
        keys: Keys,
        *,
        interval_s: float = 5.0,
        retry_initial_s: float = 1.0,
        retry_max_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.client_factory = client_factory
        self.keys = keys
        self.interval_s = interval_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = max(retry_max_s, retry_initial_s)
        self.wanted: str | None = None
        """The active version Redis named at the last read; None until Redis has answered once."""
        self._failed: str | None = None  # a version that failed to load or was refused: retried with backoff
        self._failures = 0
        self._retry_at = 0.0  # time.monotonic() before which `_failed` is not tried again

    @property
    def skew(self) -> bool:
        """True while this replica serves another version than the active one in Redis."""
        return self.wanted is not None and self.wanted != self.engine.current.name

    def retry_now(self) -> None:
        """Forget the backoff: the next reconcile tries a failed version at once (an event announced one)."""
        self._retry_at = 0.0

    def _until_retry(self) -> float:
        return max(0.0, self._retry_at - time.monotonic()) if self._failed is not None else float("inf")

    def _fail(self, name: str) -> None:
        if name != self._failed:
            self._failed, self._failures = name, 0
        self._failures += 1
        delay = min(self.retry_initial_s * 2 ** (self._failures - 1), self.retry_max_s)
        self._retry_at = time.monotonic() + delay
        logger.warning("version %s: try %d failed; next try in %.1fs", name[:80], self._failures, delay)

    async def reconcile(self, client: aioredis.Redis) -> None:
        raw = await client.get(self.keys.active_version)
        wanted = raw.decode() if isinstance(raw, bytes) else (raw or BASE)
        self.wanted = wanted
        if wanted == self.engine.current.name:
            self._failed, self._failures = None, 0
            return
        if wanted == self._failed and time.monotonic() < self._retry_at:
            return
        refusal = await self._refusal(client, wanted)
        if refusal is not None:
            if wanted != self._failed:  # logged and counted once until it changes
                self.engine.reject_version(wanted, refusal)
            self._fail(wanted)
            return
        try:
            await self.engine.activate(wanted)
            self._failed, self._failures = None, 0
        except Exception:
            logger.exception("could not activate version %s; still serving %s", wanted, self.engine.current.name)
            self._fail(wanted)

    async def _refusal(self, client: aioredis.Redis, name: str) -> str | None:
        """Why `name` must not be activated, or None."""
        if name == BASE:
            return None
        try:
            check_name(name)
        except VersionError as exc:
            return str(exc)
        if not await client.hexists(self.keys.versions, name):
            return f"version {name!r} is not in the registry ({self.keys.versions}); register it before activating"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            client = self.client_factory()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.events)
                await self.reconcile(client)
                while not stop.is_set():
                    timeout = min(self.interval_s, self._until_retry())
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=timeout)
                    if message is not None:
                        self.retry_now()  # an explicit event is worth another try
                    await self.reconcile(client)
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                logger.warning("version watcher lost Redis (%s); retrying", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=min(self.interval_s, 1.0))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
