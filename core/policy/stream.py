"""Applies one stage's match rules to a text that arrives in pieces, holding back as little as possible.

`Matcher` is the core, used for both stages: the output filter feeds it model deltas, the input
check feeds each message whole. What it emits, and the decisions it records, never depend on how
the text was split: the result is defined as Python `re` (leftmost-first) run over the whole text,
rule by rule, with the matches then applied in order of their start (block stops, redact/rewrite
replace, flag and shadow only record). Streaming gets the same answer by only deciding positions
that more text can no longer change:

- hyperscan (stream mode) reports "rule i matched, ending here"; Python runs only for such rules.
- For rule i, a match attempt at position p is final once p < N - width_i (it examines at most
  width_i + 1 characters), or once no prefix of a possible match of any rule of its group starts at
  or before p at the end of the text (the tail database, a block-mode scan of the last characters
  that reports only the leftmost such start per group, whatever the number of rules).
- The groups: rules that change text (block, redact, rewrite in mode `enforce`) and rules that only
  record (`flag`, or mode `shadow`). The filter emits up to the smallest undecided position over
  the first group only: it holds back text only while a rule that could change it could still be
  matching, and never more than the widest such rule. A record-only rule never delays the stream.
- Decisions are recorded (`on_decision`) in order of start (then rule, then end) up to the
  smallest undecided position over both groups ("settled"), so the list is the same as the
  whole-text run's and a record-only decision is recorded as soon as it and everything before it
  are final. A change already sent whose turn is still waiting is listed by `decisions` all the
  same. A block fires (stop, refusal) only once the text before it is settled: the decisions
  before a block never depend on where the caller stopped feeding. The text from the block on is
  never sent anyway, so waiting for that costs the stream nothing but a slightly later stop.

So the Python work per chunk is a fixed amount plus the rules with an exact hit to confirm: it does not
grow with the number of rules, of either group (with 1,000 keyword rules, a chunk ending in a common
word's first letters begins dozens of possible matches; none of them costs anything until one matches).

Not thread-safe: the compiled databases share one hyperscan scratch; call from one thread (the
event loop).
"""

from __future__ import annotations

import contextlib
import heapq
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass

import hyperscan

from core.policy.compiler import TAIL_CHANGES, TAIL_RECORDS, CompiledStage
from core.policy.results import Decision
from core.policy.schema import refusal_for

# Drop consumed text from the working buffer once this many characters could go.
_TRIM_AT = 4096


@dataclass
class FilterStep:
    """What one `OutputFilter.feed()` or `finish()` gives the caller. Send `text`."""

    emit: str  # filtered model text that is safe to send now (the refusal not included)
    stopped: bool = False  # a block rule fired (now or before): send nothing more, finish with "content_filter"
    refusal: str | None = None  # the operator's refusal text for that block
    blocked_here: bool = False  # the block fired in this step: its refusal goes out with this step's text

    @property
    def text(self) -> str:
        """The text to send now, refusal included: `emit`, then the refusal in the step where a block fired.

        A blocked response is what was sent before the match followed by the refusal, once.
        """
        if self.blocked_here and self.refusal:
            return self.emit + self.refusal
        return self.emit


def _ignore_match(_rule: int, _from: int, _to: int, _flags: int, _ctx: object) -> None:
    return None


def _close_stream(stream: hyperscan.Stream) -> None:
    with contextlib.suppress(hyperscan.error):  # already closed
        stream.close(match_event_handler=_ignore_match)


class Matcher:
    """One text through one stage's rules; see the module docstring for the method."""

    # Slots: attribute reads are most of the per-chunk work, and past 30 instance attributes CPython stops
    # sharing the instance dict's keys and its fast attribute reads (measured: +0.4 us a chunk at 32 attributes).
    __slots__ = (
        "__weakref__",
        "_active",
        "_always",
        "_base",
        "_buf",
        "_changes",
        "_cursor",
        "_decisions",
        "_done",
        "_finalizer",
        "_finished",
        "_grouped",
        "_hit_end",
        "_hits",
        "_hold",
        "_message_index",
        "_n",
        "_on_decision",
        "_on_hit",
        "_out",
        "_partial",
        "_pending",
        "_pieces",
        "_queue",
        "_record_hold",
        "_record_partial",
        "_records",
        "_stage",
        "_stage_name",
        "_stream",
        "_version",
        "refusal",
        "stopped",
    )

    def __init__(
        self,
        stage: CompiledStage,
        active: Collection[int],
        *,
        stage_name: str,
        version: str,
        on_decision: Callable[[Decision], None] | None = None,
        message_index: int | None = None,
    ) -> None:
        self._stage = stage
        self._active = frozenset(active)
        self._stage_name = stage_name
        self._version = version
        self._on_decision = on_decision
        self._message_index = message_index
        if len(self._active) == len(stage.rules):  # the usual case: no pass over the rules per response
            self._hold, self._record_hold, self._records = stage.hold_back, stage.record_width, stage.record_only
        else:
            widths = stage.widths
            self._records = stage.record_only & self._active
            self._hold = max((widths[i] for i in self._active if i not in self._records), default=0)
            self._record_hold = max((widths[i] for i in self._records), default=0)
        self._changes = len(self._records) < len(self._active)  # some active rule changes text
        self._grouped = bool(stage.record_only)  # two groups in the tail database: see _feed_groups
        self._always = [i for i in stage.always_hold if i in self._active]

        self._decisions: list[Decision] = []
        self.stopped = False
        self.refusal: str | None = None
        self._pieces: list[str] = []  # everything fed
        self._out: list[str] = []  # everything emitted
        self._buf = ""  # working text, from absolute offset _base to _n
        self._base = 0
        self._n = 0
        self._done = 0  # output is decided up to here (absolute, original text)
        self._cursor: dict[int, int] = {}  # rules not caught up: every match starting before cursor is queued
        self._hit_end: dict[int, int] = {}  # rules with an exact hit that Python has not looked at yet
        # Leftmost start of a match that may be growing at the end, if any: of a rule that changes text (holds the
        # output back), and of a rule that only records (holds only its decisions back).
        self._partial: int | None = None
        self._record_partial: int | None = None
        self._queue: list[tuple[int, int, int]] = []  # (start, rule index, end): final matches, not yet applied
        self._pending: list[tuple[int, int, int]] = []  # applied (or record-only) matches whose decision waits
        self._finished = False

        self._hits: set[int] = set()
        self._stream: hyperscan.Stream | None = None
        if self._active and stage.stream_db is not None:
            hits, active_set = self._hits, self._active

            def on_hit(rule: int, _from: int, _to: int, _flags: int, _ctx: object) -> None:
                if rule in active_set:
                    hits.add(rule)

            # The extension keeps only a borrowed reference to a handler given at creation, so it is
            # passed to every scan()/close() call instead and kept alive here.
            self._on_hit = on_hit
            self._stream = stage.stream_db.stream(match_event_handler=_ignore_match)
            self._stream.__enter__()  # opens the hyperscan stream; closed in finish() or by the finalizer
            self._finalizer = weakref.finalize(self, _close_stream, self._stream)

    # -- public -----------------------------------------------------------------------------

    @property
    def decisions(self) -> list[Decision]:
        """Every decision so far, in order of (start, rule, end), as the whole-text run lists them.

        The recorded ones (`on_decision` has seen them), then any final match whose turn waits for an
        earlier record-only match to end: a change already applied to the sent text is listed even if
        the stream is abandoned now (the record of an aborted response withholds its span).
        """
        if not self._pending:
            return self._decisions
        return self._decisions + [self._decision(*item) for item in sorted(self._pending)]

    @property
    def original_text(self) -> str:
        return "".join(self._pieces)

    @property
    def final_text(self) -> str:
        return "".join(self._out)

    @property
    def result_text(self) -> str:
        """What the stage turns the whole text into: the refusal if a block fired, else the filtered text."""
        if self.stopped and self.refusal is not None:
            return self.refusal
        return self.final_text

    def feed(self, text: str) -> str:
        """Add text; return what can be emitted now."""
        if self._finished:
            raise RuntimeError("feed() after finish(): a Matcher handles exactly one text")
        if not text:
            return ""
        self._pieces.append(text)
        if self.stopped:
            return ""
        prev = self._n
        self._buf += text
        self._n += len(text)
        if not self._active:
            return self._emit_to(self._n)
        if self._stream is not None:
            self._stream.scan(text.encode("utf-8"), match_event_handler=self._on_hit)
        self._note_hits()
        if self._grouped:
            return self._feed_groups(prev)
        # Every rule of the stage changes text (the usual case, kept to the one-group code: it is the hot path).
        before = self._partial
        partial = self._tail_start(prev)
        cursor = self._cursor
        # Python runs only for rules with an exact hit to confirm (and those still catching up after one). A match
        # ending in this chunk that started before it was growing at the previous end, so it starts at or after
        # that end's partial start (prefix-closure, see _tail_start): the search for a rule starts there.
        start = prev if before is None else before
        for rule in {*cursor, *self._hit_end, *self._always}:
            self._advance(rule, cursor.get(rule, start), partial)
        safe = min(cursor.values(), default=self._n)
        if partial is not None and partial < safe:
            safe = partial
        return self._process(safe, safe)

    def _feed_groups(self, prev: int) -> str:
        """feed() for a stage with rules that only record: each group with its own tail start and cursors."""
        before, record_before = self._partial, self._record_partial
        self._tail_groups(prev)
        partial, record_partial = self._partial, self._record_partial
        cursor, records = self._cursor, self._records
        start = prev if before is None else before
        record_start = prev if record_before is None else record_before
        for rule in {*cursor, *self._hit_end, *self._always}:
            if rule in records:
                self._advance(rule, cursor.get(rule, record_start), record_partial)
            else:
                self._advance(rule, cursor.get(rule, start), partial)
        n = self._n
        safe = n if partial is None else partial
        settled = n if record_partial is None else record_partial
        if not self._changes:  # only record-only rules: nothing holds the text back
            if cursor:
                settled = min(settled, *cursor.values())
            return self._process(n, settled)
        for rule, at in cursor.items():  # only rules with a hit still to decide: few, whatever the rule count
            if rule in records:
                if at < settled:
                    settled = at
            elif at < safe:
                safe = at
        return self._process(safe, min(settled, safe))

    def finish(self) -> str:
        """End of text: decide everything, return the rest to emit."""
        if self._finished:
            return ""
        self._finished = True
        if self._stream is not None:
            # Closing reports the matches that needed the end of data (a `\b` at the very end).
            self._stream.close(match_event_handler=self._on_hit)
            self._finalizer.detach()
            self._stream = None
        if self.stopped:
            return ""
        self._note_hits()
        n = self._n
        start = n if self._partial is None else self._partial
        record_start = n if self._record_partial is None else self._record_partial
        for rule in {*self._cursor, *self._hit_end}:
            self._advance(rule, self._cursor.get(rule, record_start if rule in self._records else start), None)
        return self._process(n, n)

    def close(self) -> None:
        """Release the hyperscan stream without deciding the rest (client went away).

        The final matches still waiting for their turn are recorded (and seen by `on_decision`) now.
        """
        self._record(None)
        if self._stream is not None:
            self._finalizer()
            self._stream = None
        self._finished = True

    # -- internals --------------------------------------------------------------------------

    def _note_hits(self) -> None:
        for rule in self._hits:
            self._hit_end[rule] = self._n  # the hit ended somewhere in the last chunk: n is an upper bound
        self._hits.clear()

    def _tail_start(self, prev: int) -> int | None:
        """The leftmost start of a possible match prefix (of any rule) that ends at the end of the text; None if none.

        Possible-match prefixes are prefix-closed: one that ends at the new end and starts before
        the previous end was already one at the previous end. So a scan from the leftmost start
        found last time (or from the previous end, if there was none) sees every one; with no
        match in progress the window is just the new chunk. The tail database gives every rule's
        prefix pattern the same id, so hyperscan reports one match with the leftmost start among
        them (compiler.py): one callback per chunk, whatever the number of rules. A rule outside
        this caller's scope may hold text back a little longer; it never changes what is emitted.
        Only for a stage whose rules all change text (one group); see _tail_groups.
        """
        db = self._stage.tail_db
        if db is None:
            return None
        n = self._n
        first = max(prev if self._partial is None else self._partial, n - self._hold)
        lo = max(first - 1, 0)  # one character of context, so `\b` at `first` is judged right
        window = self._buf[lo - self._base :]
        data = window.encode("utf-8")
        found: list[int] = []

        def on_prefix(_rule: int, start: int, _to: int, _flags: int, _ctx: object) -> None:
            found.append(start)

        db.scan(data, match_event_handler=on_prefix)
        if not found:
            self._partial = None
            return None
        b = min(found)  # one report; min() in case a hyperscan build reports each pattern
        start = lo + (b if len(data) == len(window) else len(data[:b].decode("utf-8")))
        # Nothing starts before `first` (see above).
        self._partial = max(start, first)
        return self._partial

    def _tail_groups(self, prev: int) -> None:
        """_tail_start for a stage with rules that only record: set each group's leftmost start (None: none).

        The same argument per group (prefix-closure holds rule by rule, so group by group): the
        window starts at the earlier of the two groups' starts. The tail database gives every
        prefix pattern of a group its group's id, so hyperscan reports one match per group with
        the leftmost start in it (compiler.py): one scan and at most two callbacks per chunk,
        whatever the number of rules.
        """
        db = self._stage.tail_db
        if db is None:
            return
        n, base = self._n, self._base
        # Each group's window start (None: no active rule in it); the scan covers both.
        lo = n
        first = record_first = None
        if self._changes:
            first = lo = max(prev if self._partial is None else self._partial, n - self._hold)
        if self._records:
            record_first = max(prev if self._record_partial is None else self._record_partial, n - self._record_hold)
            lo = min(lo, record_first)
        lo = max(lo - 1, 0)  # one character of context, so `\b` at the window start is judged right
        window = self._buf[lo - base :]
        data = window.encode("utf-8")
        found = [-1, -1]  # per group id: leftmost start (bytes into data), -1 if none

        def on_prefix(group: int, start: int, _to: int, _flags: int, _ctx: object) -> None:
            if found[group] < 0 or start < found[group]:  # one report per group; min in case a build reports more
                found[group] = start

        db.scan(data, match_event_handler=on_prefix)
        ascii_only = len(data) == len(window)
        b = found[TAIL_CHANGES]
        if b < 0 or first is None:
            self._partial = None
        else:  # nothing of this group starts before `first` (see above)
            self._partial = max(lo + (b if ascii_only else len(data[:b].decode("utf-8"))), first)
        b = found[TAIL_RECORDS]
        if b < 0 or record_first is None:
            self._record_partial = None
        else:
            self._record_partial = max(lo + (b if ascii_only else len(data[:b].decode("utf-8"))), record_first)

    def _advance(self, rule: int, cursor: int, partial: int | None) -> None:
        """Queue every final match of `rule` and move its cursor to the first undecided position."""
        compiled = self._stage.rules[rule]
        n = self._n
        if self._finished:
            final = n
        elif rule in self._always:
            final = n - compiled.width
        else:
            final = max(n - compiled.width, n if partial is None else partial)
        if self._hit_end.get(rule, -1) > cursor:
            pattern, validate, buf, base = compiled.python, compiled.validate, self._buf, self._base
            while True:
                m = pattern.search(buf, cursor - base, n - base)
                if m is None or m.start() + base >= final:
                    break
                start, end = m.start() + base, m.end() + base
                if validate is None or validate(m.group()):
                    heapq.heappush(self._queue, (start, rule, end))
                cursor = end
        cursor = max(cursor, final)
        if self._hit_end.get(rule, n + 1) <= cursor:
            del self._hit_end[rule]
        if cursor < n:
            self._cursor[rule] = cursor
        else:
            self._cursor.pop(rule, None)

    def _process(self, safe: int, settled: int) -> str:
        """Apply the queued matches and emit text up to `safe`; record decisions up to `settled` (<= safe).

        `safe`: every match of a rule that changes text starting before it is queued. `settled`: every
        match of any rule starting before it is queued.
        """
        emitted: list[str] = []
        queue = self._queue
        if queue and queue[0][0] < safe and not self.stopped:
            safe = self._apply_queued(safe, settled, emitted)
        if not self.stopped:
            pending = self._pending
            if pending and pending[0][0] < settled:
                self._record(settled)
            if self._done < safe:
                emitted.append(self._text(self._done, safe))
                self._done = safe
        self._trim()
        out = "".join(emitted)
        if out:
            self._out.append(out)
        return out

    def _apply_queued(self, safe: int, settled: int, emitted: list[str]) -> int:
        """Apply the queued matches starting before `safe`, in order; return how far text may now be emitted."""
        queue, pending, records, rules = self._queue, self._pending, self._records, self._stage.rules
        while queue and queue[0][0] < safe and not self.stopped:
            start, rule, end = item = queue[0]
            if rule not in records and rules[rule].rule.action == "block":
                if start >= settled:
                    # A record-only match before it may still be growing: the block waits for it (module
                    # docstring); the text from the block on is never sent, so only the stop comes later.
                    safe = start
                    break
                heapq.heappop(queue)
                heapq.heappush(pending, item)
                self._record(None)  # everything pending sorts before the block: all of it, the block last
                self._block(start, rule, emitted)
                break
            heapq.heappop(queue)
            heapq.heappush(pending, item)
            if rule not in records:
                self._replace(start, rule, end, emitted)
        return safe

    def _record(self, before: int | None) -> None:
        """Record the decisions of the pending matches starting before `before` (None: all), in order of
        (start, rule, end)."""
        pending = self._pending
        while pending and (before is None or pending[0][0] < before):
            decision = self._decision(*heapq.heappop(pending))
            self._decisions.append(decision)
            if self._on_decision is not None:
                self._on_decision(decision)

    def _decision(self, start: int, rule: int, end: int) -> Decision:
        model = self._stage.rules[rule].rule
        return Decision(
            rule_id=model.id,
            kind=model.kind,
            action=model.action,
            mode=model.mode,
            stage=self._stage_name,
            ruleset_version=self._version,
            span=(start, end),
            message_index=self._message_index,
        )

    def _block(self, start: int, rule: int, emitted: list[str]) -> None:
        if start > self._done:
            emitted.append(self._text(self._done, start))
            self._done = start
        self.stopped = True
        self.refusal = refusal_for(self._stage.rules[rule].rule)

    def _replace(self, start: int, rule: int, end: int, emitted: list[str]) -> None:
        """Apply a redact or rewrite match (enforce mode) to the output."""
        compiled = self._stage.rules[rule]
        model = compiled.rule
        if start > self._done:
            emitted.append(self._text(self._done, start))
            self._done = start
        if end <= self._done:  # inside text an earlier rule already replaced
            return
        if start >= self._done:
            emitted.append(compiled.tag if model.action == "redact" else (model.replacement or ""))
        # else: overlaps an earlier replacement, which now covers this match too
        self._done = end

    def _emit_to(self, safe: int) -> str:
        return self._process(safe, safe)

    def _text(self, a: int, b: int) -> str:
        return self._buf[a - self._base : b - self._base]

    def _trim(self) -> None:
        keep = min(
            self._done,
            min(self._cursor.values(), default=self._n),
            self._queue[0][0] if self._queue else self._n,
            self._n if self._partial is None else self._partial,
            self._n if self._record_partial is None else self._record_partial,
        )
        keep -= 1  # one character of context for `\b` at the first position still needed
        if keep - self._base > _TRIM_AT:
            self._buf = self._buf[keep - self._base :]
            self._base = keep


class OutputFilter:
    """The output stage for one choice of one response: feed deltas, send each step's `text`.

    The filter owns the block → refusal rule: the step in which a block fires carries the refusal in
    its `text`, once; the steps after it are empty.
    """

    def __init__(self, matcher: Matcher) -> None:
        self._m = matcher

    def feed(self, text_delta: str) -> FilterStep:
        was_stopped = self._m.stopped
        emit = self._m.feed(text_delta)
        return self._step(emit, was_stopped)

    def finish(self) -> FilterStep:
        was_stopped = self._m.stopped
        emit = self._m.finish()
        return self._step(emit, was_stopped)

    def _step(self, emit: str, was_stopped: bool) -> FilterStep:
        stopped = self._m.stopped
        return FilterStep(emit=emit, stopped=stopped, refusal=self._m.refusal, blocked_here=stopped and not was_stopped)

    def close(self) -> None:
        self._m.close()

    @property
    def stopped(self) -> bool:
        return self._m.stopped

    @property
    def refusal(self) -> str | None:
        return self._m.refusal

    @property
    def decisions(self) -> list[Decision]:
        return self._m.decisions

    @property
    def original_text(self) -> str:
        return self._m.original_text

    @property
    def final_text(self) -> str:
        return self._m.final_text
