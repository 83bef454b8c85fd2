"""Hot-swap: follow the active model version in Redis and activate it in the running engine.

Events on the pub/sub channel give speed; a periodic read of the active-version key
gives correctness (pub/sub drops messages while disconnected). A version that fails
to load is logged and counted, and the server keeps serving the one it had.

Whatever Redis holds is checked before it is loaded: the name must be `base` or v<number>
(`core.versions.check_name`) and be registered in the versions hash, and its directory must
stay under the versions root (checked by `ModelEngine.activate`). A refused name is logged and
counted as `secondstage_swaps_total{result="rejected"}`, once until it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    ) -> None:
        self.engine = engine
        self.client_factory = client_factory
        self.keys = keys
        self.interval_s = interval_s
        self._failed: str | None = None  # a version that failed to load: not retried every tick

    async def reconcile(self, client: aioredis.Redis) -> None:
        raw = await client.get(self.keys.active_version)
        wanted = raw.decode() if isinstance(raw, bytes) else (raw or BASE)
        if wanted == self.engine.current.name or wanted == self._failed:
            return
        refusal = await self._refusal(client, wanted)
        if refusal is not None:
            self._failed = wanted
            self.engine.reject_version(wanted, refusal)
            return
        try:
            await self.engine.activate(wanted)
            self._failed = None
        except Exception:
            self._failed = wanted
            logger.exception("could not activate version %s; still serving %s", wanted, self.engine.current.name)

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
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self.interval_s)
                    if message is not None:
                        self._failed = None  # an explicit event is worth another try
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
