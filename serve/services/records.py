"""What secondstage records in Redis: completions, feedback, policy-derived preference pairs.

The records are the typed ones of core/records.py, JSON-encoded into the `data`
field. They go through the bounded `LogWriter` (off the request path, spooled to
disk while Redis is down). Each stream entry carries the schema version and the
record's id, so at-least-once delivery can be deduplicated by readers.

Retention is decided here, per record: every stream is trimmed to about `maxlen` entries and
to `ttl_s` of age, and a completion's lookup key expires after `ttl_s` (see docs/security.md,
"Data at rest"). `store_raw_output` says whether the model's unfiltered text may be stored.

Completion ids carry the time they were made (`chatcmpl-<uuid7 hex>`: a UUIDv7's first 48 bits are the Unix
time in ms). With several replicas on one Redis, feedback may reach a replica before the completion's record
does: the replica that made it may still be draining its queue, or replaying its spool after an outage. So
`lookup` answers `UNCHECKED` (accepted, verified by align when it joins feedback to completions) for an id that
is not in Redis but was made less than `unverified_window_s` ago; an older unknown id is a 404. A made-up id
with a recent time gains nothing: it is accepted as feedback on nothing, exactly as while Redis is down.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, NamedTuple, Protocol

import msgspec
import redis.asyncio as aioredis

from core.keys import Keys
from core.records import CompletionRecord, FeedbackRecord, PolicyPair, RecordError, decode, encode_text

logger = logging.getLogger("secondstage.records")


_ID = re.compile(r"^[a-z]+-([0-9a-f]{32})(?:-[0-9]+)?$")
# How far ahead of this replica's clock an id's time may be (another replica's clock may run ahead).
_CLOCK_SKEW_S = 60.0


def new_completion_id(prefix: str, now: float | None = None) -> str:
    """`<prefix>-<32 hex>`: a UUIDv7 (48 bits of Unix ms, version 7, 74 random bits), so the id tells its time."""
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 80) | (0x7 << 76) | (secrets.randbits(12) << 64) | (0b10 << 62) | secrets.randbits(62)
    return f"{prefix}-{value:032x}"


def completion_id_time(completion_id: str) -> float | None:
    """When a completion id was made (Unix seconds), or None for ids without a time (older uuid4 ids, others)."""
    match = _ID.match(completion_id)
    if match is None or match.group(1)[12] != "7":
        return None
    return int(match.group(1)[:12], 16) / 1000


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
        unverified_window_s: float = 0.0,
    ) -> None:
        self.writer = writer
        self.unverified_window_s = unverified_window_s
        """An unknown completion id made less than this long ago is accepted unverified (see the module docstring)."""
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
            return UNCHECKED if self._maybe_elsewhere(completion_id) else None
        try:
            record = decode(raw, CompletionRecord)
        except RecordError as exc:
            # Written by a server with another schema, or damaged: let align decide when it reads it.
            logger.warning("cannot read completion %s (%s); accepting feedback unverified", key, exc)
            return UNCHECKED
        return CompletionRef(len(record.choices), record.key, record.version)

    def _maybe_elsewhere(self, completion_id: str) -> bool:
        """True if another replica may have made this id and not written its record yet (it is recent)."""
        made = completion_id_time(completion_id)
        if made is None or self.unverified_window_s <= 0:
            return False
        age = time.time() - made
        if -_CLOCK_SKEW_S <= age <= self.unverified_window_s:
            logger.info(
                "completion %s is not in Redis yet (made %.1fs ago); accepting feedback unverified", completion_id, age
            )
            return True
        return False
