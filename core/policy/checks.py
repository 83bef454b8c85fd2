"""Runs every rule's `examples:` against the compiled rule set (what `secondstage policy check` does).

Each match/no_match text is checked with the rule alone, at every stage the rule has. For match
kinds the text is also streamed one character at a time, which must give exactly the same result
as the whole text: a failing example there is a bug in the rule's pattern or in the filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.policy.input import bad_chars, limit_violations
from core.policy.loading import PolicySet
from core.policy.schema import MATCH_KINDS, LimitRule, UnicodeRule, refusal_for
from core.policy.stream import Matcher


@dataclass
class ExampleFailure:
    rule_id: str
    file: str
    stage: str
    text: str
    problem: str


@dataclass
class Applied:
    fired: bool
    text: str  # the text after the rule: redacted/rewritten, or the refusal when blocked


def _apply_match(ps: PolicySet, rule: Any, stage: str, text: str, *, chunked: bool = False) -> Applied:
    compiled = ps.stages[stage]
    index = next(r.index for r in compiled.rules if r.rule.id == rule.id)
    m = Matcher(compiled, [index], stage_name=stage, version=ps.version)
    for piece in text if chunked else [text]:
        m.feed(piece)
    m.finish()
    return Applied(bool(m.decisions), m.result_text)


def apply_rule(ps: PolicySet, rule: Any, stage: str, text: str) -> Applied:
    """What `rule` alone does to `text` at `stage` (in enforce mode, whatever its mode is)."""
    if rule.kind in MATCH_KINDS:
        return _apply_match(ps, rule, stage, text)
    if isinstance(rule, LimitRule):
        fired = bool(limit_violations(rule, [{"role": "user", "content": text}]))
        return Applied(fired, refusal_for(rule) if fired and rule.action == "block" else text)
    if isinstance(rule, UnicodeRule):
        bad = set(bad_chars(text, rule))
        if bad and rule.action == "block":
            return Applied(True, refusal_for(rule))
        if bad and rule.action == "strip":
            return Applied(True, "".join(ch for i, ch in enumerate(text) if i not in bad))
        return Applied(bool(bad), text)
    return Applied(True, text)  # instructions always apply


def run_examples(ps: PolicySet) -> tuple[list[ExampleFailure], int]:
    """Check every example of every rule; returns the failures and how many checks ran."""
    failures: list[ExampleFailure] = []
    ran = 0
    for rule in ps.rules:
        if rule.examples is None:
            continue
        file = ps.rule_files[rule.id]
        for stage in rule.stages:
            for ex in rule.examples.match_examples():
                ran += 1
                got = apply_rule(ps, rule, stage, ex.text)
                if not got.fired:
                    failures.append(ExampleFailure(rule.id, file, stage, ex.text, "expected a match, got none"))
                elif ex.result is not None and got.text != ex.result:
                    failures.append(
                        ExampleFailure(
                            rule.id, file, stage, ex.text, f"expected result {ex.result!r}, got {got.text!r}"
                        )
                    )
                if rule.kind in MATCH_KINDS:
                    streamed = _apply_match(ps, rule, stage, ex.text, chunked=True)
                    if streamed.text != got.text:
                        failures.append(
                            ExampleFailure(
                                rule.id,
                                file,
                                stage,
                                ex.text,
                                f"streamed one character at a time gives {streamed.text!r}, whole gives {got.text!r}",
                            )
                        )
            for text in rule.examples.no_match:
                ran += 1
                got = apply_rule(ps, rule, stage, text)
                if got.fired:
                    failures.append(ExampleFailure(rule.id, file, stage, text, f"expected no match, got {got.text!r}"))
    return failures, ran
