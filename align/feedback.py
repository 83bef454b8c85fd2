"""Read the feedback (and policy pairs) align has not used yet, joined with the completions they judge.

The server appends feedback to `keys.feedback` and output-policy rewrites to `keys.policy_pairs`. Align reads
both through the consumer group `keys.align_group`:

- a real run reads with the group (first the entries an earlier, failed run left pending, then new ones) and
  XACKs them only after a version is published, so a run that fails or is gated out retrains on the same data;
- `all_feedback=True` trains on every entry in the streams (re-training from scratch "when asked"), and still
  acknowledges what the group had not consumed yet;
- `consume=False` (dry runs, `feedback export`) only looks: it reads the group's pending entries and those past
  its last-delivered id with XRANGE and changes nothing in Redis.

Entries are decoded into the typed records of core/records.py (`FeedbackRecord`, `PolicyPair`, and the
`CompletionRecord` each feedback refers to); an entry that does not decode is skipped and counted as malformed.
Logging is at-least-once, so entries are deduplicated by their `id`. Feedback whose completion record is gone (or
unreadable) is skipped and counted. At most `max_rows_per_user` feedback entries per identity (the API key that
posted them, never the client-set `user`) are taken in one run, so one identity cannot dominate a version: its
**newest** entries in what the run reads. The older ones make room (`user_cap`) and stay pending for later
runs. Newest first because the newest vote or correction is the most relevant, and because the entries a
refused run left pending are read first (they are older): kept oldest first, they would fill the cap again and
the identity's newer feedback would never be read — the same batch, the same (seeded) training, the same
refusal, round after round. One identity has one vote per completion choice: when it sent several
feedback records with a signal (thumbs, rating, correction, preferred choice) on the same choice, the latest one
(stream order) is taken and the earlier ones are skipped as
`superseded` — a client that changes its mind, or one that repeats a thumbs-down to weigh it more, counts once
(an earlier vote the cap had deferred is superseded too, so it cannot come back in a later run).

Two guards make what reaches training trustworthy:

- **Already trained.** Feedback and policy pairs whose ids a published version lists (`Manifest.feedback_ids`,
  the gate's `heldout_feedback_ids`, `policy_pair_ids` in the registry) are skipped (`already_trained`) and, on a
  consuming read, acknowledged at once. The job acknowledges only after it publishes, so a run killed between
  the two leaves its entries pending; this is what keeps the next run from training them a second time.
  `all_feedback=True` (`align run --all`) is the operator asking to retrain on everything and skips nothing.
- **Corrections through the policies.** With a policy set (`policies`, the operator's rule files), each
  correction goes through every input and output rule again (core/policy/correction.py) — serve did so when it
  accepted it, but rules change — before it can become a "chosen" answer: redactions are applied
  (`correction_redacted` in `screened`), and a correction an enforced block rule stops is dropped from that
  feedback (`correction_blocked`) while its other signals (thumbs, rating) still count.
- **Refused too often.** With a refusal ledger (align/refusals.py), an entry the gate refused `max_refusals`
  times, or dead-lettered already, is skipped (`dead_lettered`) and, on a consuming read, acknowledged and
  recorded as a dead letter. `all_feedback=True` skips nothing here either.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis

from align.refusals import EntryRef, Kind, RefusalLedger
from core.keys import Keys
from core.policy import PolicyError, PolicySet, check_correction, load_policy_set
from core.records import CompletionRecord, FeedbackRecord, PolicyPair, RecordError, decode
from core.versions import Registry

_PAGE = 500
Entry = tuple[str, dict[str, str]]


class FeedbackError(Exception):
    """The feedback streams cannot be read as expected."""


@dataclass(frozen=True)
class FeedbackItem:
    """One feedback event with the completion record it refers to."""

    id: str
    entry_id: str
    completion_id: str
    feedback: FeedbackRecord
    completion: CompletionRecord
    user: str


@dataclass(frozen=True)
class PolicyPairItem:
    """One preference pair the output policy produced (rejected = model text, chosen = the enforced rewrite)."""

    id: str
    entry_id: str
    completion_id: str | None
    pair: PolicyPair


@dataclass
class FeedbackBatch:
    feedback: list[FeedbackItem] = field(default_factory=list)
    policy_pairs: list[PolicyPairItem] = field(default_factory=list)
    to_ack: dict[str, list[str]] = field(default_factory=dict)
    """Stream key → entry ids delivered through the group, to XACK once the run is published."""
    skipped: Counter[str] = field(default_factory=Counter)
    """Why entries were left out: duplicate, malformed, missing_completion, malformed_completion, user_cap and
    completion_pending (both deferred to a later run), already_trained (a published version used it),
    superseded (the same identity's later feedback on the same choice replaced it), dead_lettered (refused
    max_refusals times, align/refusals.py), and correction_blocked (the correction only: a block rule stopped
    it)."""
    screened: Counter[str] = field(default_factory=Counter)
    """What the policies changed in what is kept: correction_redacted (a rule redacted or rewrote a correction)."""
    superseded: list[tuple[str, str]] = field(default_factory=list)
    """(feedback id, completion id) of each vote a later one of the same identity replaced: consumed with the run
    and listed with the version's feedback ids (align/datasets.py), so a rerun after a crash between publish and
    acknowledge cannot train them either."""
    superseded_entry_ids: dict[str, str] = field(default_factory=dict)
    """Feedback id → stream entry id of each superseded vote (align/refusals.py counts refusals against them)."""
    already_trained: dict[str, list[str]] = field(default_factory=dict)
    """Stream key → entry ids a published version already trained on (acknowledged by a consuming read)."""
    dead_lettered: list[EntryRef] = field(default_factory=list)
    """Entries skipped as dead_lettered (dead-lettered by a consuming read)."""
    # What parsing remembers from one page to the next: ids seen (dedupe), the items kept so far and each
    # identity's window of them (the cap), the votes, and what was deferred. `feedback` is filled at the end.
    _seen_feedback: set[str] = field(default_factory=set, repr=False)
    _seen_pairs: set[str] = field(default_factory=set, repr=False)
    _kept: dict[int, FeedbackItem] = field(default_factory=dict, repr=False)
    """Sequence number (order kept) → item; a superseding vote gets a new number, so the order is stream order."""
    _windows: dict[str, deque[int]] = field(default_factory=dict, repr=False)
    """Identity → sequence numbers of its kept items, oldest first (at most max_rows_per_user)."""
    _votes: dict[tuple[str, str, int], int | str] = field(default_factory=dict, repr=False)
    """(identity, completion id, choice index) → that identity's vote on it: a sequence number in `_kept`, or the
    entry id of a vote the cap deferred."""
    _deferred_votes: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """Entry id → (feedback id, completion id) of each vote the cap deferred."""
    _deferred: set[str] = field(default_factory=set, repr=False)
    """Entry ids left pending for a later run (user_cap, completion_pending)."""
    _next: int = field(default=0, repr=False)

    @property
    def entries(self) -> int:
        return len(self.feedback) + len(self._kept) + len(self.policy_pairs)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: dict[Any, Any] | None) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in (raw or {}).items()}


def _read_entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREAD(GROUP) reply: a list of [stream, entries] (RESP2) or a dict (RESP3)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0] if reply else [])
    return list(reply[0][1])


def _after(entry_id: str) -> str:
    """The exclusive XRANGE start just after `entry_id` ("(" prefix, Redis ≥ 6.2)."""
    return f"({entry_id}"


def load_policies(policies_dir: Path) -> PolicySet:
    """The operator's rule set that corrections are checked against; FeedbackError naming the fix if it fails."""
    try:
        return load_policy_set(Path(policies_dir))
    except PolicyError as e:
        raise FeedbackError(
            f"cannot check corrections against the policies: {e}. Point SECONDSTAGE_POLICIES_DIR at the rule files "
            "serve enforces (an empty directory applies no rules)"
        ) from e


class FeedbackReader:
    """Reads the align consumer group on the feedback and policy-pair streams."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        consumer: str = "align",
        max_rows_per_user: int = 50,
        include_policy_pairs: bool = True,
        missing_completion_wait_s: float = 3600.0,
        policies: PolicySet | None = None,
        max_rows: int = 10_000,
        refusals: RefusalLedger | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self.group = keys.align_group
        self.consumer = consumer
        self.max_rows_per_user = max_rows_per_user
        self.include_policy_pairs = include_policy_pairs
        self.missing_completion_wait_s = missing_completion_wait_s
        self.policies = policies
        """Corrections are checked against this set; None: not checked (see the module docstring)."""
        self.max_rows = max_rows
        """Most entries one read takes; the rest stays undelivered or pending for later runs."""
        self.refusals = refusals
        """Entries it dead-lettered (or counts at max_refusals) are skipped; None: no refusal guard."""
        self.clock = clock

    @property
    def streams(self) -> list[str]:
        return [self.keys.feedback, *([self.keys.policy_pairs] if self.include_policy_pairs else [])]

    def ensure_groups(self) -> None:
        """Create the consumer group at the start of each stream (and the stream itself) if missing."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # --- reading -------------------------------------------------------------------------------------------

    def read(self, *, all_feedback: bool = False, consume: bool = True) -> FeedbackBatch:
        """Collect the entries to train on. See the module docstring for `all_feedback` and `consume`.

        Streams are read a page at a time (at most `_PAGE` entries) and each page is parsed (decoded, joined with
        its completions) before the next is read, so raw entries never pile up: memory grows with the rows
        taken, never with the stream. At most `max_rows` entries are taken per read (each page asks for no more
        than the room left); what is not read stays undelivered or pending, and the next run takes it. With
        `all_feedback` that means the first `max_rows` entries of each stream.
        """
        batch = FeedbackBatch()
        if consume:
            self.ensure_groups()

        def room() -> int:
            return min(_PAGE, self.max_rows - batch.entries)

        trained_feedback, trained_pairs = (set(), set()) if all_feedback else self._trained_ids()
        ledger = None if all_feedback else self.refusals
        for stream in self.streams:
            pages: Iterable[list[Entry]]
            if consume:
                acks = batch.to_ack.setdefault(stream, [])
                if all_feedback:
                    # Acknowledge what the group had not consumed (ids only), train on the stream from its start.
                    for page in self._group_pages(stream, lambda: min(_PAGE, self.max_rows - len(acks))):  # noqa: B023
                        acks.extend(entry_id for entry_id, _ in page)
                    pages = self._xrange_pages(stream, "-", room)
                else:
                    pages = self._noting_acks(self._group_pages(stream, room), acks)
            else:
                pages = self._xrange_pages(stream, "-", room) if all_feedback else self._peek_pages(stream, room)
            for page in pages:
                if stream == self.keys.feedback:
                    self._parse_feedback(page, batch, trained_feedback, ledger)
                else:
                    self._parse_policy_pairs(page, batch, trained_pairs, ledger)
        # The identities' kept windows, in stream order; corrections screened only now, so what the cap let go
        # is not counted as screened.
        batch.feedback = [self._screened(item, batch) for item in batch._kept.values()]
        batch._kept.clear()
        # Entries deferred by the per-user cap (or waiting for their completion) stay pending for a later run.
        deferred = batch._deferred
        if deferred and self.keys.feedback in batch.to_ack:
            batch.to_ack[self.keys.feedback] = [i for i in batch.to_ack[self.keys.feedback] if i not in deferred]
        if consume:
            self._ack_already_trained(batch)
            if ledger is not None and batch.dead_lettered:
                ledger.dead_letter(batch.dead_lettered, self.group)
                done = {ref.entry_id for ref in batch.dead_lettered}
                for stream in batch.to_ack:
                    batch.to_ack[stream] = [i for i in batch.to_ack[stream] if i not in done]
        return batch

    def used(self, batch: FeedbackBatch) -> list[EntryRef]:
        """Every entry `batch` would consume with a version: its feedback (held-out included), the votes that
        feedback superseded, and its policy pairs — what a refusal counts against (align/refusals.py)."""
        fb, pp = self.keys.feedback, self.keys.policy_pairs
        return [
            *(EntryRef("feedback", fb, item.entry_id, item.id) for item in batch.feedback),
            *(EntryRef("feedback", fb, entry_id, fid) for fid, entry_id in batch.superseded_entry_ids.items()),
            *(EntryRef("policy_pair", pp, item.entry_id, item.id) for item in batch.policy_pairs),
        ]

    def _skip_blocked(
        self,
        kind: Kind,
        stream: str,
        decoded: list[tuple[str, str]],
        batch: FeedbackBatch,
        ledger: RefusalLedger | None,
    ) -> set[str]:
        """The record ids among (entry id, record id) `decoded` the ledger blocks, noted as dead_lettered."""
        if ledger is None:
            return set()
        blocked = ledger.blocked(kind, (record_id for _, record_id in decoded))
        for entry_id, record_id in decoded:
            if record_id in blocked:
                batch.skipped["dead_lettered"] += 1
                batch.dead_lettered.append(EntryRef(kind, stream, entry_id, record_id))
        return blocked

    def _trained_ids(self) -> tuple[set[str], set[str]]:
        """The feedback and policy-pair ids every published version (the registry) trained on."""
        feedback: set[str] = set()
        pairs: set[str] = set()
        try:
            manifests = Registry(self.client, self.keys).manifests()
        except RecordError as e:
            # Without every manifest the run cannot tell what was trained already: refuse rather than retrain.
            raise FeedbackError(f"a manifest in {self.keys.versions} does not decode ({e}); fix or remove it") from e
        for manifest in manifests.values():
            feedback.update(manifest.feedback_ids)
            # Held-out feedback evaluated the version (align/split.py) and is consumed with it: a later run must
            # not train on it either, or a crash before the acknowledgement would turn test data into training data.
            feedback.update(str(i) for i in manifest.gate.get("heldout_feedback_ids") or [])
            pairs.update(manifest.policy_pair_ids)
        return feedback, pairs

    def _ack_already_trained(self, batch: FeedbackBatch) -> None:
        """Finish the acknowledgement a run killed after publishing did not make (see the module docstring)."""
        for stream, entry_ids in batch.already_trained.items():
            done = set(entry_ids)
            for start in range(0, len(entry_ids), _PAGE):
                self.client.xack(stream, self.group, *entry_ids[start : start + _PAGE])
            if stream in batch.to_ack:
                batch.to_ack[stream] = [i for i in batch.to_ack[stream] if i not in done]

    @staticmethod
    def _noting_acks(pages: Iterable[list[Entry]], acks: list[str]) -> Iterator[list[Entry]]:
        for page in pages:
            acks.extend(entry_id for entry_id, _ in page)
            yield page

    def ack(self, batch: FeedbackBatch) -> int:
        """Acknowledge what `batch` consumed; call only after its version is published."""
        done = 0
        for stream, ids in batch.to_ack.items():
            for start in range(0, len(ids), _PAGE):
                done += int(self.client.xack(stream, self.group, *ids[start : start + _PAGE]))
        return done

    def _group_pages(self, stream: str, room: Callable[[], int]) -> Iterator[list[Entry]]:
        """Entries for this run, a page at a time: everything pending in the group (a failed run's data), then new.

        Each page asks for `room()` entries at most; reading stops when it is 0, and what was not read stays
        pending (or undelivered) for a later run.
        """
        # Pending entries may belong to another consumer name (e.g. a renamed job): claim them. The Redis lock
        # guarantees no other align run is using them right now.
        cursor = "0-0"
        while True:
            claimed: Any = self.client.xautoclaim(stream, self.group, self.consumer, 0, start_id=cursor, count=_PAGE)
            cursor = _s(claimed[0])
            if cursor == "0-0":
                break
        for start in ("0", ">"):
            last = start
            while (count := room()) > 0:
                entries = _read_entries(self.client.xreadgroup(self.group, self.consumer, {stream: last}, count=count))
                if not entries:
                    break
                yield [(_s(entry_id), _fields(fields)) for entry_id, fields in entries]
                if start == "0":
                    last = _s(entries[-1][0])

    def _xrange_pages(self, stream: str, start: str, room: Callable[[], int]) -> Iterator[list[Entry]]:
        while (count := room()) > 0:
            entries = self.client.xrange(stream, min=start, max="+", count=count)
            if not entries:
                return
            yield [(_s(i), _fields(f)) for i, f in entries]
            start = _after(_s(entries[-1][0]))

    def _peek_pages(self, stream: str, room: Callable[[], int]) -> Iterator[list[Entry]]:
        """What a consuming read would return, without touching the group: pending + undelivered entries."""
        last_delivered = "0-0"
        try:
            groups = self.client.xinfo_groups(stream)
        except redis.ResponseError:  # no such stream yet
            return
        for info in groups:
            if _s(info.get("name")) == self.group:
                last_delivered = _s(info.get("last-delivered-id"))
        if last_delivered != "0-0":
            start = "-"
            while (count := room()) > 0:
                rows = self.client.xpending_range(stream, self.group, min=start, max="+", count=count)
                if not rows:
                    break
                pipe = self.client.pipeline(transaction=False)
                for row in rows:
                    pipe.xrange(stream, min=row["message_id"], max=row["message_id"])
                yield [(_s(i), _fields(f)) for found in pipe.execute() for i, f in found]
                start = _after(_s(rows[-1]["message_id"]))
        yield from self._xrange_pages(stream, "-" if last_delivered == "0-0" else _after(last_delivered), room)

    # --- parsing -------------------------------------------------------------------------------------------

    def _parse_feedback(
        self,
        entries: Iterable[tuple[str, dict[str, str]]],
        batch: FeedbackBatch,
        trained: set[str],
        ledger: RefusalLedger | None,
    ) -> None:
        """Add a page of feedback entries to `batch` (the rules are in the module docstring)."""
        seen = batch._seen_feedback
        decoded: list[tuple[str, FeedbackRecord]] = []
        for entry_id, fields in entries:
            try:
                record = decode(fields["data"], FeedbackRecord)
            except (KeyError, RecordError):
                batch.skipped["malformed"] += 1
                continue
            if record.id in trained:
                batch.skipped["already_trained"] += 1
                batch.already_trained.setdefault(self.keys.feedback, []).append(entry_id)
                continue
            decoded.append((entry_id, record))
        blocked = self._skip_blocked(
            "feedback", self.keys.feedback, [(entry_id, r.id) for entry_id, r in decoded], batch, ledger
        )
        candidates: list[tuple[str, FeedbackRecord]] = []
        for entry_id, record in decoded:
            if record.id in blocked:
                continue
            if record.id in seen:
                batch.skipped["duplicate"] += 1
                continue
            seen.add(record.id)
            candidates.append((entry_id, record))
        completions = self._completions([r.completion_id for _, r in candidates], batch)
        for entry_id, record in candidates:
            completion = completions.get(record.completion_id)
            if completion is None:
                # Serve accepts feedback it cannot check yet (Redis down, or the completion made on another
                # replica whose writer is still backlogged): keep such feedback pending for later runs, and
                # drop it only once its completion had time to arrive.
                if self.clock() - record.created < self.missing_completion_wait_s:
                    batch.skipped["completion_pending"] += 1
                    batch._deferred.add(entry_id)
                else:
                    batch.skipped["missing_completion"] += 1
                continue
            # The authenticated identity, never the client-set `user`: feedback from before records carried
            # `key` falls back to the completion's key (only its owner may post feedback on it).
            user = record.key or completion.key or "anonymous"
            self._take(
                batch,
                FeedbackItem(
                    id=record.id,
                    entry_id=entry_id,
                    completion_id=record.completion_id,
                    feedback=record,
                    completion=completion,
                    user=user,
                ),
            )

    @staticmethod
    def _vote(item: FeedbackItem) -> tuple[str, str, int] | None:
        """The (identity, completion, choice) `item` votes on; None for a comment alone, which trains nothing and
        so neither replaces nor is replaced by a vote."""
        r = item.feedback
        if all(v is None for v in (r.thumbs, r.rating, r.correction, r.preferred_choice)):
            return None
        return (item.user, item.completion_id, r.choice_index)

    def _take(self, batch: FeedbackBatch, item: FeedbackItem) -> None:
        """Keep `item` (read in stream order) in its identity's window of newest entries; see the module
        docstring for why newest first, and for votes."""
        window = batch._windows.setdefault(item.user, deque())
        vote = self._vote(item)
        if vote is not None and (earlier := batch._votes.pop(vote, None)) is not None:
            # One vote per identity and choice: the later record replaces the earlier one, so repeating a vote
            # cannot weigh it more.
            batch.skipped["superseded"] += 1
            if isinstance(earlier, int):  # kept: the new vote takes its slot in the window (the cap is unchanged)
                old = batch._kept.pop(earlier)
                window.remove(earlier)
                old_id, old_completion, old_entry = old.id, old.completion_id, old.entry_id
            else:  # deferred by the cap: superseded now, so it does not train in a later run either
                old_entry = earlier
                old_id, old_completion = batch._deferred_votes.pop(earlier)
                batch._deferred.discard(earlier)
                batch.skipped["user_cap"] -= 1  # each entry is counted under one reason
                if not batch.skipped["user_cap"]:
                    del batch.skipped["user_cap"]
            batch.superseded.append((old_id, old_completion))
            batch.superseded_entry_ids[old_id] = old_entry
        if len(window) >= self.max_rows_per_user:
            # The identity's oldest kept entry makes room and stays pending for a later run.
            oldest = batch._kept.pop(window.popleft())
            batch.skipped["user_cap"] += 1
            batch._deferred.add(oldest.entry_id)
            if (oldest_vote := self._vote(oldest)) is not None:
                batch._votes[oldest_vote] = oldest.entry_id
                batch._deferred_votes[oldest.entry_id] = (oldest.id, oldest.completion_id)
        seq = batch._next
        batch._next += 1
        batch._kept[seq] = item
        window.append(seq)
        if vote is not None:
            batch._votes[vote] = seq

    def _screened(self, item: FeedbackItem, batch: FeedbackBatch) -> FeedbackItem:
        screened = self._screen(item.feedback, batch)
        return item if screened is item.feedback else dataclasses.replace(item, feedback=screened)

    def _screen(self, record: FeedbackRecord, batch: FeedbackBatch) -> FeedbackRecord:
        """`record` with its correction as the policies leave it (None when a block rule stops it)."""
        if self.policies is None or record.correction is None:
            return record
        checked = check_correction(self.policies, record.correction)
        if checked.text is None:
            batch.skipped["correction_blocked"] += 1
        elif checked.changed:
            batch.screened["correction_redacted"] += 1
        else:
            return record
        return msgspec.structs.replace(record, correction=checked.text)

    def _completions(self, ids: list[str], batch: FeedbackBatch) -> dict[str, CompletionRecord]:
        unique = list(dict.fromkeys(ids))
        out: dict[str, CompletionRecord] = {}
        for start in range(0, len(unique), _PAGE):
            chunk = unique[start : start + _PAGE]
            for cid, raw in zip(chunk, self.client.mget([self.keys.completion(c) for c in chunk]), strict=True):
                if raw is None:
                    continue
                try:
                    out[cid] = decode(raw, CompletionRecord)
                except RecordError:
                    # Its feedback is then skipped as missing_completion; this counts why, once per completion.
                    batch.skipped["malformed_completion"] += 1
        return out

    def _parse_policy_pairs(
        self,
        entries: Iterable[tuple[str, dict[str, str]]],
        batch: FeedbackBatch,
        trained: set[str],
        ledger: RefusalLedger | None,
    ) -> None:
        seen = batch._seen_pairs
        decoded: list[tuple[str, str, PolicyPair, dict[str, str]]] = []
        for entry_id, fields in entries:
            try:
                pair = decode(fields["data"], PolicyPair)
                # Pairs written before the record carried its ids have them only in the entry's fields.
                pair_id = pair.id or fields["id"]
            except (KeyError, RecordError):
                batch.skipped["malformed"] += 1
                continue
            if pair_id in trained:
                batch.skipped["already_trained"] += 1
                batch.already_trained.setdefault(self.keys.policy_pairs, []).append(entry_id)
                continue
            decoded.append((entry_id, pair_id, pair, fields))
        blocked = self._skip_blocked(
            "policy_pair", self.keys.policy_pairs, [(e, i) for e, i, _, _ in decoded], batch, ledger
        )
        for entry_id, pair_id, pair, fields in decoded:
            if pair_id in blocked:
                continue
            if pair_id in seen:
                batch.skipped["duplicate"] += 1
                continue
            seen.add(pair_id)
            batch.policy_pairs.append(
                PolicyPairItem(
                    id=pair_id,
                    entry_id=entry_id,
                    completion_id=pair.completion_id or fields.get("completion_id"),
                    pair=pair,
                )
            )
