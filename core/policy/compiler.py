"""Compiles the text-matching rules of one stage into hyperscan databases plus Python patterns.

Per stage (input, output) there are two hyperscan databases over all match rules, so the cost of
scanning a chunk does not grow with the number of rules:

- `stream`: stream mode, the exact patterns. A report means "rule i matched, ending here"; only
  then does Python (`re`, leftmost-first) run for that rule to find the precise spans.
- `tail`: block mode with leftmost start-of-match, each rule's *prefix* pattern anchored at the
  end. Scanned over the last characters after each chunk (at most the widest rule), it says where
  a match could still be growing. The prefixes come in two groups, one id each: rules that change
  text (block, redact, rewrite in mode `enforce`; id `TAIL_CHANGES`) and rules that only record
  (`flag`, or any action in mode `shadow`; id `TAIL_RECORDS`). Hyperscan reports one match per id
  and end offset with the leftmost start of that group (its start-of-match dedupe keeps the minimum
  per id), so a scan costs at most two Python callbacks whatever the number of rules. The first
  group's start is exactly the text the stream filter must hold back; the second only says when a
  record-only rule's decisions are final, so flag and shadow rules never delay the stream.
  tests/core/policy/test_scale.py checks both against a database with one id per rule.

We use stream mode for exact matches instead of start-of-match tracking because hyperscan refuses
SOM on many bounded-repeat patterns ("Pattern is too large"); the prefix patterns are relaxed to
open-ended repeats, which it accepts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import hyperscan

from core.policy.errors import PolicyError
from core.policy.presets import check_preset
from core.policy.regex import Analysed, PatternError, analyse, keywords_pattern
from core.policy.schema import KeywordsRule, PresetRule, RegexRule

log = logging.getLogger("secondstage.policy")

MatchRuleModel = KeywordsRule | RegexRule | PresetRule


@dataclass(frozen=True)
class CompiledRule:
    """One match rule ready to run: its model, where it came from, and its Python pattern."""

    index: int  # position in its stage's rule list == hyperscan expression id
    rule: MatchRuleModel
    file: str
    analysed: Analysed
    python: re.Pattern[str]
    validate: Callable[[str], bool] | None
    tag: str
    always_hold: bool = False  # no usable prefix pattern: hold back the full width while active

    @property
    def width(self) -> int:
        return self.analysed.max_width

    @property
    def records_only(self) -> bool:
        """True for a rule that only records (`flag`, or any action in mode `shadow`): it never changes text."""
        return self.rule.mode == "shadow" or self.rule.action == "flag"


@dataclass
class CompiledStage:
    rules: list[CompiledRule]
    stream_db: hyperscan.Database | None
    tail_db: hyperscan.Database | None
    hold_back: int  # characters: the widest match of a rule that changes text (what streaming may hold back)
    always_hold: list[int] = field(default_factory=list)
    record_only: frozenset[int] = frozenset()  # indices of the rules that only record (CompiledRule.records_only)
    record_width: int = 0  # characters: the widest match of a rule that only records

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a reload compiles in a worker process): the hyperscan databases travel serialised."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("widths", "all_indices", "unscoped")}
        for name in ("stream_db", "tail_db"):
            if state[name] is not None:
                state[name] = hyperscan.dumpb(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, mode in (("stream_db", hyperscan.HS_MODE_STREAM), ("tail_db", hyperscan.HS_MODE_BLOCK)):
            if state[name] is not None:
                db = hyperscan.loadb(state[name], mode)
                db.scratch = hyperscan.Scratch(db)  # loadb() gives a database without one; scanning needs it
                state[name] = db
        self.__dict__.update(state)

    @cached_property
    def widths(self) -> list[int]:
        """Each rule's widest match, by index."""
        return [r.width for r in self.rules]

    @cached_property
    def all_indices(self) -> frozenset[int]:
        """Every rule's index: the active set of a caller every rule applies to (built once, not per request)."""
        return frozenset(r.index for r in self.rules)

    @cached_property
    def unscoped(self) -> bool:
        """True when no rule has a scope or roles: every rule applies to every caller and message."""
        return all(r.rule.scope is None and getattr(r.rule, "roles", None) is None for r in self.rules)


def analyse_rule(rule: MatchRuleModel, file: str) -> tuple[Analysed, Callable[[str], bool] | None, str]:
    """Analyse one rule's pattern; PolicyError names the file, rule and field on failure."""
    validate = None
    if isinstance(rule, KeywordsRule):
        source = keywords_pattern(rule.keywords, whole_word=rule.whole_word)
        caseless, max_len, fld, tag = not rule.case_sensitive, None, "keywords", "[REDACTED]"
    elif isinstance(rule, RegexRule):
        source, caseless, max_len, fld, tag = (
            rule.pattern,
            not rule.case_sensitive,
            rule.max_len,
            "pattern",
            "[REDACTED]",
        )
    else:
        try:
            preset = check_preset(rule.preset)
        except ValueError as exc:
            raise PolicyError(str(exc), file=file, rule_id=rule.id, field="preset") from None
        source, caseless, max_len, fld, tag = preset.pattern, preset.caseless, None, "preset", preset.tag
        validate = preset.validate
    try:
        analysed = analyse(source, caseless=caseless, max_len=max_len)
    except PatternError as exc:
        field_name = "max_len" if "max_len" in str(exc) and fld == "pattern" else fld
        raise PolicyError(str(exc), file=file, rule_id=rule.id, field=field_name) from None
    return analysed, validate, rule.tag or tag


def _hs_flags(a: Analysed, som: bool) -> int:
    flags = hyperscan.HS_FLAG_UTF8
    if a.caseless:
        flags |= hyperscan.HS_FLAG_CASELESS
    if a.dotall:
        flags |= hyperscan.HS_FLAG_DOTALL
    if a.multiline:
        flags |= hyperscan.HS_FLAG_MULTILINE
    if som:
        flags |= hyperscan.HS_FLAG_SOM_LEFTMOST
    return flags


def _compile(mode: int, exprs: Sequence[tuple[int, str, int]]) -> hyperscan.Database:
    db = hyperscan.Database(mode=mode)
    db.compile(
        expressions=[e[1].encode("utf-8") for e in exprs],
        ids=[e[0] for e in exprs],
        elements=len(exprs),
        flags=[e[2] for e in exprs],
    )
    return db


def _failing(mode: int, exprs: Sequence[tuple[int, str, int]]) -> list[int]:
    """Positions of the expressions hyperscan cannot compile, found by halving the set that failed.

    A compile has a large fixed cost: one per expression made a 1,000-rule set with one bad rule take
    1,000 compiles; halving takes about 2·log2(n).
    """
    if len(exprs) == 1:
        return [0]
    mid = len(exprs) // 2
    out: list[int] = []
    for offset, part in ((0, exprs[:mid]), (mid, exprs[mid:])):
        try:
            _compile(mode, part)
        except hyperscan.error:
            out.extend(offset + k for k in _failing(mode, part))
    return out


# The tail database's two ids: every prefix of a rule that changes text, and every prefix of a rule that only records.
TAIL_CHANGES = 0
TAIL_RECORDS = 1


def _group_ids(exprs: Sequence[tuple[int, str, int]], record_only: frozenset[int]) -> list[tuple[int, str, int]]:
    """The tail expressions under their group's id, so that a scan reports one leftmost start per group (module
    docstring)."""
    return [(TAIL_RECORDS if e[0] in record_only else TAIL_CHANGES, e[1], e[2]) for e in exprs]


def compile_stage(entries: Sequence[tuple[MatchRuleModel, str]]) -> CompiledStage:
    """Compile the match rules of one stage. `entries` are (rule, file) in rule-set order."""
    compiled: list[CompiledRule] = []
    for i, (rule, file) in enumerate(entries):
        analysed, validate, tag = analyse_rule(rule, file)
        field_name = {"keywords": "keywords", "regex": "pattern", "preset": "preset"}[rule.kind]
        try:
            python = re.compile(analysed.python, analysed.python_flags())
        except re.error as exc:  # pragma: no cover - analyse() already parsed it
            raise PolicyError(
                f"Python cannot compile the pattern: {exc}", file=file, rule_id=rule.id, field=field_name
            ) from None
        compiled.append(CompiledRule(i, rule, file, analysed, python, validate, tag))
    if not compiled:
        return CompiledStage([], None, None, 0)
    record_only = frozenset(r.index for r in compiled if r.records_only)

    stream_exprs = [(r.index, r.analysed.trigger, _hs_flags(r.analysed, som=False)) for r in compiled]
    try:
        stream_db = _compile(hyperscan.HS_MODE_STREAM, stream_exprs)
    except hyperscan.error:
        # Some pattern is too big for an exact automaton. Hyperscan's prefilter mode compiles a
        # superset of it instead, which is all we need: Python confirms every hit anyway.
        for k in _failing(hyperscan.HS_MODE_STREAM, stream_exprs):
            r, expr = compiled[k], stream_exprs[k]
            loose = (expr[0], expr[1], expr[2] | hyperscan.HS_FLAG_PREFILTER)
            try:
                _compile(hyperscan.HS_MODE_STREAM, [loose])
            except hyperscan.error as exc:
                raise PolicyError(
                    f"the matcher cannot compile this pattern ({exc}); simplify it or lower its repeat bounds",
                    file=r.file,
                    rule_id=r.rule.id,
                    field={"keywords": "keywords", "regex": "pattern", "preset": "preset"}[r.rule.kind],
                ) from None
            stream_exprs[k] = loose
        stream_db = _compile(hyperscan.HS_MODE_STREAM, stream_exprs)

    tail_exprs = [
        (r.index, r.analysed.prefix, _hs_flags(r.analysed, som=True)) for r in compiled if r.analysed.prefix is not None
    ]
    always: list[int] = [r.index for r in compiled if r.analysed.prefix is None]
    tail_db: hyperscan.Database | None = None
    try:
        tail_db = _compile(hyperscan.HS_MODE_BLOCK, _group_ids(tail_exprs, record_only)) if tail_exprs else None
    except hyperscan.error:
        bad = _failing(hyperscan.HS_MODE_BLOCK, tail_exprs)
        ok = [expr for k, expr in enumerate(tail_exprs) if k not in set(bad)]
        for k in bad:
            r = compiled[tail_exprs[k][0]]
            log.warning(
                "policy rule %r (%s): no prefix matcher (hyperscan cannot compile it); its full width (%d chars) "
                "is held back while streaming",
                r.rule.id,
                r.file,
                r.width,
            )
            always.append(r.index)
        tail_db = _compile(hyperscan.HS_MODE_BLOCK, _group_ids(ok, record_only)) if ok else None
    for i in always:
        compiled[i] = CompiledRule(**{**compiled[i].__dict__, "always_hold": True})
    return CompiledStage(
        rules=compiled,
        stream_db=stream_db,
        tail_db=tail_db,
        hold_back=max((r.width for r in compiled if not r.records_only), default=0),
        always_hold=sorted(always),
        record_only=record_only,
        record_width=max((r.width for r in compiled if r.records_only), default=0),
    )
