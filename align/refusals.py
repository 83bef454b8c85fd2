"""Gate refusals per feedback entry, and the dead letters: what keeps one batch from being retried forever.

A run the gate refuses publishes and acknowledges nothing, so its feedback stays pending and the next run trains
on it again, with whatever arrived since — which may change the verdict. A batch nothing changes (no new
feedback, a fixed seed) would be refused the same way round after round. So each refusal is counted against
every entry the refused run used (its feedback, held-out included; the votes that feedback superseded; its
policy pairs) in `<p>:align:refusals`. An entry refused `max_refusals` times (align/settings.py) is
dead-lettered: in one MULTI it is acknowledged in the align group, written to `<p>:align:dead_letters` with the
refusals that put it there (run ids, times, failed checks), and its count removed. The reader
(align/feedback.py) skips a dead-lettered record — a duplicate stream entry of it too — and any entry whose
count already reached `max_refusals` (the setting was lowered, or a run died before dead-lettering it), and
dead-letters it on a consuming read. `secondstage align refusals` lists both hashes.

The counts live in Redis, so they survive restarts and every align runner shares them; runs are serialised by
the align lock (align/job.py), so a count's read-modify-write is not raced. A run that lost its lock does not
count its refusal: a missed count only delays dead-lettering by one refusal. Entries are keyed by record id
(the feedback's or policy pair's `id`), not stream entry id, like the published-version guard: at-least-once
logging can write one record twice.

Not counted: `align run --all` (the operator's explicit retrain on everything: its refusal says nothing about
one batch, and it skips nothing, dead letters included), runs that failed for another reason (training crash,
Redis), and entries a run deferred (per-identity cap, completion not there yet): they did not train. A version
that publishes drops the counts of what it consumed; its entries are never read again anyway.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec
import redis

from core.keys import Keys

Kind = Literal["feedback", "policy_pair"]

_KEEP = 10
"""Refusals kept per entry (the newest): enough to say why, bounded when max_refusals is large."""
_CHUNK = 500


class Refusal(msgspec.Struct, frozen=True):
    """One gate refusal: the run it refused (align/job.py's run id), when, and the checks that failed."""

    run: str
    at: float
    failed: list[str]
    reason: str = ""


class RefusedEntry(msgspec.Struct):
    """The JSON of one field of `<p>:align:refusals` or `<p>:align:dead_letters`."""

    kind: Kind
    id: str
    entry_id: str
    count: int = 0
    refusals: list[Refusal] = []
    dead_lettered_at: float | None = None


@dataclass(frozen=True)
class EntryRef:
    """One stream entry a run used: which stream, its entry id (to acknowledge it) and its record id (the key)."""

    kind: Kind
    stream: str
    entry_id: str
    record_id: str

    @property
    def field(self) -> str:
        return f"{self.kind}:{self.record_id}"


@dataclass(frozen=True)
class RefusalOutcome:
    refused: int
    """Entries whose refusal count went up."""
    dead_lettered: int
    """Of those, entries that reached max_refusals and were dead-lettered."""


def _decode(raw: bytes | str | None) -> RefusedEntry | None:
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=RefusedEntry)
    except msgspec.DecodeError:
        # A value written by hand or by a future schema: counted as no refusal; the next refusal rewrites it.
        return None


class RefusalLedger:
    """Refusal counts and dead letters in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, max_refusals: int) -> None:
        self.client = client
        self.keys = keys
        self.max_refusals = max_refusals

    def blocked(self, kind: Kind, record_ids: Iterable[str]) -> set[str]:
        """The ids among `record_ids` that must not train: dead-lettered, or refused max_refusals times already."""
        ids = list(dict.fromkeys(record_ids))
        if not ids:
            return set()
        fields = [f"{kind}:{i}" for i in ids]
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(self.keys.align_dead_letters, fields)
        pipe.hmget(self.keys.align_refusals, fields)
        dead, counted = pipe.execute()
        out = set()
        for record_id, d, c in zip(ids, dead, counted, strict=True):
            entry = _decode(c)
            if d is not None or (entry is not None and entry.count >= self.max_refusals):
                out.add(record_id)
        return out

    def refuse(self, entries: list[EntryRef], refusal: Refusal, group: str) -> RefusalOutcome:
        """Count one refusal against each of `entries`; dead-letter those that reach max_refusals."""
        entries = list({e.field: e for e in entries}.values())
        if not entries:
            return RefusalOutcome(0, 0)
        current = self.client.hmget(self.keys.align_refusals, [e.field for e in entries])
        counted: dict[str, bytes] = {}
        dead: list[tuple[EntryRef, RefusedEntry]] = []
        for ref, raw in zip(entries, current, strict=True):
            before = _decode(raw) or RefusedEntry(kind=ref.kind, id=ref.record_id, entry_id=ref.entry_id)
            after = msgspec.structs.replace(
                before, entry_id=ref.entry_id, count=before.count + 1, refusals=[*before.refusals, refusal][-_KEEP:]
            )
            if after.count >= self.max_refusals:
                dead.append((ref, after))
            else:
                counted[ref.field] = msgspec.json.encode(after)
        pipe = self.client.pipeline(transaction=True)
        if counted:
            pipe.hset(self.keys.align_refusals, mapping=counted)  # type: ignore[arg-type]
        self._dead_letter(pipe, dead, group)
        pipe.execute()
        return RefusalOutcome(refused=len(entries), dead_lettered=len(dead))

    def dead_letter(self, entries: list[EntryRef], group: str) -> int:
        """Dead-letter `entries` the reader found blocked (acknowledge, record, drop the count); how many."""
        if not entries:
            return 0
        current = self.client.hmget(self.keys.align_refusals, [e.field for e in entries])
        dead = [
            (ref, _decode(raw) or RefusedEntry(kind=ref.kind, id=ref.record_id, entry_id=ref.entry_id))
            for ref, raw in zip(entries, current, strict=True)
        ]
        pipe = self.client.pipeline(transaction=True)
        self._dead_letter(pipe, dead, group)
        pipe.execute()
        return len(dead)

    def _dead_letter(self, pipe: redis.client.Pipeline, dead: list[tuple[EntryRef, RefusedEntry]], group: str) -> None:
        if not dead:
            return
        now = time.time()
        by_stream: dict[str, list[str]] = {}
        for ref, entry in dead:
            by_stream.setdefault(ref.stream, []).append(ref.entry_id)
            # HSETNX: a duplicate stream entry of a record already dead-lettered keeps the first dead letter.
            pipe.hsetnx(
                self.keys.align_dead_letters,
                ref.field,
                msgspec.json.encode(msgspec.structs.replace(entry, dead_lettered_at=now)),
            )
        for stream, ids in by_stream.items():
            for start in range(0, len(ids), _CHUNK):
                pipe.xack(stream, group, *ids[start : start + _CHUNK])
        pipe.hdel(self.keys.align_refusals, *{ref.field for ref, _ in dead})

    def forget(self, entries: Iterable[EntryRef]) -> None:
        """Drop the counts of entries a published version consumed (they are never read again)."""
        fields = list({e.field for e in entries})
        for start in range(0, len(fields), _CHUNK):
            self.client.hdel(self.keys.align_refusals, *fields[start : start + _CHUNK])

    def dead_letter_count(self) -> int:
        return int(self.client.hlen(self.keys.align_dead_letters))

    def refused(self, limit: int | None = None) -> list[RefusedEntry]:
        """Entries refused fewer than max_refusals times so far, most refused first (at most `limit`)."""
        entries = self._scan(self.keys.align_refusals)
        entries.sort(key=lambda e: (-e.count, -(e.refusals[-1].at if e.refusals else 0.0), e.id))
        return entries[:limit] if limit is not None else entries

    def dead_letters(self, limit: int | None = None) -> list[RefusedEntry]:
        """Dead-lettered entries, newest first (at most `limit`)."""
        entries = self._scan(self.keys.align_dead_letters)
        entries.sort(key=lambda e: (-(e.dead_lettered_at or 0.0), e.id))
        return entries[:limit] if limit is not None else entries

    def _scan(self, key: str) -> list[RefusedEntry]:
        # HSCAN rather than HGETALL: the dead letters grow over the deployment's life; Redis serves them in pages.
        return [e for _, raw in self.client.hscan_iter(key, count=_CHUNK) if (e := _decode(raw)) is not None]
