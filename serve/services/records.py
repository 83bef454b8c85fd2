"""What secondstage records in Redis: completions, feedback, policy-derived preference pairs.

Records go through the bounded `LogWriter` (off the request path, spooled to disk
while Redis is down). Each stream entry carries the schema version and the
record's id, so at-least-once delivery can be deduplicated by readers.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from typing import Any, Protocol

import redis.asyncio as aioredis

from core.keys import SCHEMA_VERSION, Keys

logger = logging.getLogger("secondstage.records")


class Writer(Protocol):
    def submit(self, record: Any) -> None: ...
    def is_pending(self, index_key: str) -> bool: ...


class Recorder:
    """Builds stream entries and hands them to the writer; answers "does this completion exist?"."""

    def __init__(
        self, writer: Writer, client: aioredis.Redis | None, keys: Keys, *, recent: int = 100_000, record_cls: Any
    ) -> None:
        self.writer = writer
        self.client = client
        self.keys = keys
        self._record_cls = record_cls
        # id -> number of choices, for completions this process served recently: feedback
        # can be validated without a Redis round trip, and while Redis is down.
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._recent_max = recent

    def completion(self, record: dict[str, Any]) -> None:
        record = {"schema": int(SCHEMA_VERSION), "kind": "completion", **record}
        data = json.dumps(record, ensure_ascii=False)
        self._remember(record["id"], len(record.get("choices", [])))
        self.writer.submit(
            self._record_cls(
                stream=self.keys.completions,
                fields={"schema": SCHEMA_VERSION, "id": record["id"], "data": data},
                index_key=self.keys.completion(record["id"]),
                index_value=data,
            )
        )

    def feedback(self, record: dict[str, Any]) -> None:
        record = {"schema": int(SCHEMA_VERSION), "kind": "feedback", **record}
        self.writer.submit(
            self._record_cls(
                stream=self.keys.feedback,
                fields={
                    "schema": SCHEMA_VERSION,
                    "id": record["id"],
                    "completion_id": record["completion_id"],
                    "data": json.dumps(record, ensure_ascii=False),
                },
            )
        )

    def policy_pair(self, pair_id: str, completion_id: str, pair: dict[str, Any]) -> None:
        self.writer.submit(
            self._record_cls(
                stream=self.keys.policy_pairs,
                fields={
                    "schema": SCHEMA_VERSION,
                    "id": pair_id,
                    "completion_id": completion_id,
                    "data": json.dumps(pair, ensure_ascii=False),
                },
            )
        )

    def _remember(self, completion_id: str, n: int) -> None:
        self._recent[completion_id] = n
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    async def choices_of(self, completion_id: str) -> int | None:
        """Number of choices of a completion; None if unknown; -1 if it cannot be checked now (Redis down)."""
        if completion_id in self._recent:
            return self._recent[completion_id]
        key = self.keys.completion(completion_id)
        if self.writer.is_pending(key):
            return -1
        if self.client is None:
            return -1
        try:
            raw = await self.client.get(key)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            logger.warning("cannot check completion %s in Redis (%s); accepting feedback unverified", key, exc)
            return -1
        if raw is None:
            return None
        return len(json.loads(raw).get("choices", []))
