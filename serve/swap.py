"""Hot-swap: follow the active model version in Redis and activate it in the running engine.

Events on the pub/sub channel give speed; a periodic read of the active-version key
gives correctness (pub/sub drops messages while disconnected). A version that fails
to load is logged and counted, and the server keeps serving the one it had; it is tried again
after `retry_initial_s`, doubling per failure up to `retry_max_s` (an event announcing a version
tries at once). Meanwhile the replica is skewed: `wanted` (the active version in Redis) differs
from what it serves, and /health, /v1/models and `secondstage_version_skew` say so.

While a canary runs (`<p>:canary`, core/canary.py) the watcher keeps it loaded beside the incumbent and
hands the engine its share and run, so the engine routes the same identities to it on every replica; a
promotion (the canary becomes `active_version`) or a rollback (the canary hash goes) arrives the same
way, by event or by the periodic read. A canary that fails to load is retried with the same backoff,
and meanwhile everyone is served the incumbent (`wanted_canary` tells /health the skew).

Whatever Redis holds is checked before it is loaded: the name must be `base` or v<number>
(`core.versions.check_name`) and be registered in the versions hash, and its directory must
stay under the versions root (checked by `ModelEngine.activate`). A refused name is logged and
counted as `secondstage_swaps_total{result="rejected"}`, once until it changes.

In merged-weights mode (serve/engine.py) `activate` merges (when needed) and reloads the engine's weights
instead of loading an adapter; a merge or reload that fails is reported and retried exactly like an adapter
that fails to load, while the old weights go on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from core.canary import CanaryState, aread
from core.keys import Keys
from core.versions import BASE, VersionError, check_name

if TYPE_CHECKING:
    from serve.engine import ModelEngine

logger = logging.getLogger("secondstage.swap")


class _Backoff:
    """A version that failed to load or was refused, and when to try it again (doubling per failure)."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.failed: str | None = None
        self.failures = 0
        self.retry_at = 0.0  # time.monotonic() before which `failed` is not tried again

    def clear(self) -> None:
        self.failed, self.failures = None, 0

    def due(self, name: str) -> bool:
        return name != self.failed or time.monotonic() >= self.retry_at

    def until_retry(self) -> float:
        return max(0.0, self.retry_at - time.monotonic()) if self.failed is not None else float("inf")

    def fail(self, name: str) -> None:
        if name != self.failed:
            self.failed, self.failures = name, 0
        self.failures += 1
        delay = min(self.initial_s * 2 ** (self.failures - 1), self.max_s)
        self.retry_at = time.monotonic() + delay
        logger.warning("version %s: try %d failed; next try in %.1fs", name[:80], self.failures, delay)


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
        self.wanted_canary: CanaryState | None = None
        """The canary Redis named at the last read; None when none runs."""
        self._incumbent = _Backoff(retry_initial_s, self.retry_max_s)
        self._canary = _Backoff(retry_initial_s, self.retry_max_s)

    @property
    def skew(self) -> bool:
        """True while this replica serves another version (incumbent or canary) than Redis names."""
        if self.wanted is not None and self.wanted != self.engine.current.name:
            return True
        return self.wanted_canary is not None and not self._canary_served(self.wanted_canary)

    def _canary_served(self, wanted: CanaryState) -> bool:
        route = self.engine.canary
        return route is not None and (route.version.name, route.run, route.share) == (
            wanted.version,
            wanted.run,
            wanted.share,
        )

    def retry_now(self) -> None:
        """Forget the backoff: the next reconcile tries a failed version at once (an event announced one)."""
        self._incumbent.retry_at = self._canary.retry_at = 0.0

    def _until_retry(self) -> float:
        return min(self._incumbent.until_retry(), self._canary.until_retry())

    async def reconcile(self, client: aioredis.Redis) -> None:
        wanted, canary = await aread(client, self.keys)
        self.wanted, self.wanted_canary = wanted, canary
        # The incumbent first: on a promotion the canary becomes it in one step (ModelEngine.activate).
        if wanted == self.engine.current.name:
            self._incumbent.clear()
        elif self._incumbent.due(wanted) and await self._allowed(client, wanted, self._incumbent):
            try:
                await self.engine.activate(wanted)
                self._incumbent.clear()
            except Exception:
                logger.exception("could not activate %s; still serving %s", wanted, self.engine.current.name)
                self._incumbent.fail(wanted)
        if canary is None or canary.incumbent != self.engine.current.name:
            # No canary, or one judged against another incumbent than this replica serves: nobody is routed.
            if self.engine.canary is not None:
                await self.engine.set_canary(None)
            self._canary.clear()
            return
        if self._canary_served(canary):
            self._canary.clear()
            return
        if not self._canary.due(canary.version) or not await self._allowed(client, canary.version, self._canary):
            return
        try:
            await self.engine.set_canary(canary.version, share=canary.share, run=canary.run, since=canary.since)
            self._canary.clear()
        except Exception:
            logger.exception("could not load canary %s; %s serves everyone", canary.version, self.engine.current.name)
            self._canary.fail(canary.version)
            if self.engine.canary is not None:
                await self.engine.set_canary(None)

    async def _allowed(self, client: aioredis.Redis, name: str, backoff: _Backoff) -> bool:
        refusal = await self._refusal(client, name)
        if refusal is None:
            return True
        if name != backoff.failed:  # logged and counted once until it changes
            self.engine.reject_version(name, refusal)
        backoff.fail(name)
        return False

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
