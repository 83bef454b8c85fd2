"""Applies one stage's match rules to a text that arrives in pieces, holding back as little as possible.

`Matcher` is the core, used for both stages: the output filter feeds it model deltas, the input
check feeds each message whole. What it emits never depends on how the text was split: the
result is defined as Python `re` (leftmost-first) run over the whole text, rule by rule, with the
matches then applied in order of their start (block stops, redact/rewrite replace, flag and shadow
only record). Streaming gets the same answer by only deciding positions that more text can no
longer change:

- hyperscan (stream mode) reports "rule i matched, ending here"; Python runs only for such rules.
- For rule i, a match attempt at position p is final once p < N - width_i (it examines at most
  width_i + 1 characters), or once no prefix of a possible match of any rule starts at or before p
  at the end of the text (the tail database, a block-mode scan of the last `hold_back` characters
  that reports only the leftmost such start, whatever the number of rules).
- The filter emits up to the smallest undecided position over all rules: it holds back text only
  while some pattern could still be matching, and never more than the widest rule.

So the Python work per chunk is a fixed amount plus the rules with an exact hit to confirm: it does not
grow with the number of rules (with 1,000 keyword rules, a chunk ending in a common word's first
letters begins dozens of possible matches; none of them costs anything until one matches).

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

from core.policy.compiler import CompiledStage
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
            self._hold = stage.hold_back
        else:
            widths = stage.widths
            self._hold = max((widths[i] for i in self._active), default=0)
        self._always = [i for i in stage.always_hold if i in self._active]

        self.decisions: list[Decision] = []
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
        self._partial: int | None = None  # leftmost start of a match that may be growing at the end, if any
        self._queue: list[tuple[int, int, int]] = []  # (start, rule index, end)
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
        return self._process(safe if partial is None else min(safe, partial))

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
        start = self._n if self._partial is None else self._partial
        for rule in {*self._cursor, *self._hit_end}:
            self._advance(rule, self._cursor.get(rule, start), None)
        return self._process(self._n)

    def close(self) -> None:
        """Release the hyperscan stream without deciding the rest (client went away)."""
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

    def _process(self, safe: int) -> str:
        emitted: list[str] = []
        while self._queue and self._queue[0][0] < safe and not self.stopped:
            start, rule, end = heapq.heappop(self._queue)
            self._apply(start, rule, end, emitted)
        if not self.stopped and self._done < safe:
            emitted.append(self._text(self._done, safe))
            self._done = safe
        self._trim()
        out = "".join(emitted)
        if out:
            self._out.append(out)
        return out

    def _apply(self, start: int, rule: int, end: int, emitted: list[str]) -> None:
        compiled = self._stage.rules[rule]
        model = compiled.rule
        decision = Decision(
            rule_id=model.id,
            kind=model.kind,
            action=model.action,
            mode=model.mode,
            stage=self._stage_name,
            ruleset_version=self._version,
            span=(start, end),
            message_index=self._message_index,
        )
        self.decisions.append(decision)
        if self._on_decision is not None:
            self._on_decision(decision)
        if model.mode == "shadow" or model.action == "flag":
            return
        if start > self._done:
            emitted.append(self._text(self._done, start))
            self._done = start
        if model.action == "block":
            self.stopped = True
            self.refusal = refusal_for(model)
            return
        if end <= self._done:  # inside text an earlier rule already replaced
            return
        if start >= self._done:
            emitted.append(compiled.tag if model.action == "redact" else (model.replacement or ""))
        # else: overlaps an earlier replacement, which now covers this match too
        self._done = end

    def _emit_to(self, safe: int) -> str:
        return self._process(safe)

    def _text(self, a: int, b: int) -> str:
        return self._buf[a - self._base : b - self._base]

    def _trim(self) -> None:
        keep = min(
            self._done,
            min(self._cursor.values(), default=self._n),
            self._queue[0][0] if self._queue else self._n,
            self._n if self._partial is None else self._partial,
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
