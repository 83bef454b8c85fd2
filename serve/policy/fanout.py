"""Policy reloads across replicas: one replica's POST /admin/policies/reload reaches every replica.

The replica that reloaded publishes `{"type": "reload", "origin": <replica>, "version": <hash>}` on the
policy channel (`Keys.policy_events`); every other replica reloads its own files (off the event loop, one
reload at a time, like any reload). A replica's own announcements are ignored.

Pub/sub drops messages while a subscriber is disconnected, so a replica that lost Redis reloads once when it
subscribes again: it may have missed an announcement, and a reload of unchanged files changes nothing. A
publish that fails (Redis away) is logged, and the reload on this replica stands; the others catch up when
their own file watchers see the files change (a Kubernetes ConfigMap reaches each pod on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from core.keys import Keys

if TYPE_CHECKING:
    from core.policy.engine import PolicyEngine
    from core.policy.results import ReloadResult

log = logging.getLogger("secondstage.policy")

_REDIS_ERRORS = (aioredis.ConnectionError, aioredis.TimeoutError, OSError)


class PolicyFanout:
    """Publishes this replica's reloads; reloads when another replica announces one."""

    def __init__(
        self,
        engine: PolicyEngine,
        client_factory: Callable[[], aioredis.Redis],
        keys: Keys,
        replica: str,
        *,
        retry_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.client_factory = client_factory
        self.keys = keys
        self.replica = replica
        self.retry_s = retry_s
        self.received = 0
        """Announcements from other replicas this one reloaded for."""

    def attach(self) -> None:
        """Announce every reload the engine is asked for (the admin route's), not the ones this fan-out makes."""
        self.engine.on_reload = self.announce

    async def announce(self, result: ReloadResult) -> None:
        event = json.dumps({"type": "reload", "origin": self.replica, "version": result.version})
        client = self.client_factory()
        try:
            await client.publish(self.keys.policy_events, event)
        except _REDIS_ERRORS as exc:
            log.warning("policy reload %s not announced to the other replicas (Redis: %s)", result.version, exc)
        finally:
            await client.aclose()

    async def run(self, stop: asyncio.Event) -> None:
        """Listen for other replicas' reloads until `stop` is set; reconnect while Redis is away."""
        lost = False
        while not stop.is_set():
            client = self.client_factory()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.keys.policy_events)
                if lost:
                    log.info("policy channel back; reloading once in case an announcement was missed")
                    await self._reload()
                    lost = False
                while not stop.is_set():
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        await self._handle(message.get("data"))
            except _REDIS_ERRORS as exc:
                lost = True
                log.warning("policy fan-out lost Redis (%s); retrying", exc)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.retry_s)
            finally:
                with contextlib.suppress(*_REDIS_ERRORS):
                    await pubsub.aclose()
                with contextlib.suppress(*_REDIS_ERRORS):
                    await client.aclose()

    async def _handle(self, data: object) -> None:
        try:
            event = json.loads(data.decode() if isinstance(data, bytes) else str(data))
        except (ValueError, UnicodeDecodeError):
            log.warning("ignoring a malformed message on %s: %r", self.keys.policy_events, data)
            return
        if not isinstance(event, dict) or event.get("type") != "reload" or event.get("origin") == self.replica:
            return
        log.info("replica %s reloaded policies (%s); reloading here", event.get("origin"), event.get("version"))
        self.received += 1
        await self._reload()

    async def _reload(self) -> None:
        # A rejected rule file is reported by the reload itself (the last good set stays); anything else it
        # raises (an unreadable directory) is logged here, so that this replica keeps listening.
        try:
            await self.engine.reload_off_loop(announce=False)
        except Exception:
            log.exception("policy reload announced by another replica failed; keeping the active rule set")
