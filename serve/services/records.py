"""What secondstage records in Redis: completions, feedback, policy-derived preference pairs.

The records are the typed ones of core/records.py, JSON-encoded into the `data`
field. They go through the bounded `LogWriter` (off the request path, spooled to
disk while Redis is down). Each stream entry carries the schema version and the
record's id, so at-least-once delivery can be deduplicated by readers.

Retention is decided here, per record: every stream is trimmed to about `maxlen` entries and
to `ttl_s` of age, and a completion's lookup key expires after `ttl_s` (see docs/security.md,
"Data at rest"). `store_raw_output` says whether the model's unfiltered text may be stored.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, NamedTuple, Protocol

import msgspec
import redis.asyncio as aioredis

from core.keys import Keys
from core.records import CompletionRecord, FeedbackRecord, PolicyPair, RecordError, decode, encode_text

logger = logging.getLogger("secondstage.records")


class Writer(Protocol):
    def submit(self, record: Any) -> None: ...
    def is_pending(self, index_key: str) -> bool: ...


class CompletionRef(NamedTuple):
    """What feedback needs to know about a completion: its number of choices and who made it."""

    choices: int
    """-1: it cannot be checked now (Redis down, written elsewhere in an unreadable shape); owner unknown too."""
    key: str | None
    """The key id of the identity that made it (`CompletionRecord.key`); None for an anonymous caller."""
    version: str | None = None
    """The model version that made it (`CompletionRecord.version`); None when it cannot be checked now."""

    @property
    def checked(self) -> bool:
        return self.choices >= 0


UNCHECKED = CompletionRef(-1, None)


class Recorder:
    """Builds stream entries and hands them to the writer; answers "does this completion exist?"."""

    def __init__(
        self,
        writer: Writer,
        client: aioredis.Redis | None,
        keys: Keys,
        *,
        recent: int = 100_000,
        record_cls: Any,
        maxlen: int | None = None,
        ttl_s: int | None = None,
        store_raw_output: bool = False,
    ) -> None:
        self.writer = writer
        self.client = client
        self.keys = keys
        self._record_cls = record_cls
        self.maxlen = maxlen
        self.ttl_s = ttl_s
        self.store_raw_output = store_raw_output
        """Keep the model's unfiltered text (`raw_text`, a pair's `rejected`) in clear; read by finish.py."""
        # id -> (number of choices, owner), for completions this process served recently: feedback
        # can be validated (and its poster checked) without a Redis round trip, and while Redis is down.
        self._recent: OrderedDict[str, CompletionRef] = OrderedDict()
        self._recent_max = recent

    def completion(self, record: CompletionRecord) -> None:
        data = encode_text(record)
        self._remember(record.id, CompletionRef(len(record.choices), record.key, record.version))
        self.writer.submit(
            self._record_cls(
                stream=self.keys.completions,
                fields={"schema": str(record.schema), "id": record.id, "data": data},
                index_key=self.keys.completion(record.id),
                index_value=data,
                maxlen=self.maxlen,
                ttl_s=self.ttl_s,
            )
        )

    def feedback(self, record: FeedbackRecord) -> None:
        self.writer.submit(
            self._record_cls(
                stream=self.keys.feedback,
                fields={
                    "schema": str(record.schema),
                    "id": record.id,
                    "completion_id": record.completion_id,
                    "data": encode_text(record),
                },
                maxlen=self.maxlen,
                ttl_s=self.ttl_s,
            )
        )

    def policy_pair(self, pair_id: str, completion_id: str, pair: PolicyPair) -> None:
        # The policy engine does not know the ids; the stored pair carries them like every other record.
        pair = msgspec.structs.replace(pair, id=pair_id, completion_id=completion_id)
        self.writer.submit(
            self._record_cls(
                stream=self.keys.policy_pairs,
                fields={
                    "schema": str(pair.schema),
                    "id": pair_id,
                    "completion_id": completion_id,
                    "data": encode_text(pair),
                },
                maxlen=self.maxlen,
                ttl_s=self.ttl_s,
            )
        )

    def _remember(self, completion_id: str, ref: CompletionRef) -> None:
        self._recent[completion_id] = ref
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    async def lookup(self, completion_id: str) -> CompletionRef | None:
        """A completion's choices and owner; None if unknown; `UNCHECKED` if it cannot be checked now (Redis down)."""
        if completion_id in self._recent:
            return self._recent[completion_id]
        key = self.keys.completion(completion_id)
        if self.writer.is_pending(key):
            return UNCHECKED
        if self.client is None:
            return UNCHECKED
        try:
            raw = await self.client.get(key)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            logger.warning("cannot check completion %s in Redis (%s); accepting feedback unverified", key, exc)
            return UNCHECKED
        if raw is None:
            return None
        try:
            record = decode(raw, CompletionRecord)
        except RecordError as exc:
            # Written by a server with another schema, or damaged: let align decide when it reads it.
            logger.warning("cannot read completion %s (%s); accepting feedback unverified", key, exc)
            return UNCHECKED
        return CompletionRef(len(record.choices), record.key, record.version)
