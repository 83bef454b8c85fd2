"""A user's correction through the operator's rules, before it can become a "chosen" training answer.

A correction (`POST /v1/feedback` `correction`) is text a user typed that align turns into the answer the model
is taught to give. So it must pass both sides of the rules: what the input stage cleans from what users send
(secrets, card numbers) and what the output stage forbids the model to say (e-mail addresses, phone numbers).
`check_correction` runs, in order:

1. the unicode rules (strip or block invisible and control characters);
2. every match rule of the input stage, then every match rule of the output stage, each on the whole text.

Every rule applies, whatever its `scope` or `roles`: scopes pick which callers a rule guards at request time,
but a correction trains the one model every caller is then served by. Limit and instruction rules do not apply
(they bound and steer a request, not a text). Enforced redact/rewrite rules change the text; an enforced block
makes the correction untrainable (`text` is None); flag and shadow rules are only recorded.

serve calls it when it accepts feedback (serve/services/feedback.py: a block is a 400 naming `correction`, a
redaction is stored redacted) and align again when it builds training rows (align/feedback.py), because the
rules may have changed since. The decisions are not counted in the policy metrics: those count requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.policy.input import bad_chars
from core.policy.loading import PolicySet
from core.policy.results import Decision
from core.policy.schema import UnicodeRule
from core.policy.stream import Matcher


@dataclass
class CorrectionCheck:
    """What the rules made of one correction."""

    original: str
    text: str | None
    """The trainable text (redacted where a rule redacted); None when an enforced block rule fired."""
    decisions: list[Decision] = field(default_factory=list)
    ruleset_version: str = ""

    @property
    def blocked_by(self) -> str | None:
        """The id of the enforced rule that blocked the correction, if one did."""
        if self.text is not None:
            return None
        return next((d.rule_id for d in self.decisions if d.action == "block" and d.mode == "enforce"), None)

    @property
    def changed(self) -> bool:
        return self.text != self.original


def check_correction(ps: PolicySet, text: str) -> CorrectionCheck:
    """`text` through the set's unicode rules and every input and output match rule; see the module docstring."""
    result = CorrectionCheck(original=text, text=text, ruleset_version=ps.version)

    def decide(rule: UnicodeRule, span: tuple[int, int], detail: str) -> Decision:
        d = Decision(
            rule_id=rule.id, kind=rule.kind, action=rule.action, mode=rule.mode, stage="input",
            ruleset_version=ps.version, span=span, detail=detail,
        )  # fmt: skip
        result.decisions.append(d)
        return d

    current = text
    for urule in (r for r in ps.rules if isinstance(r, UnicodeRule)):
        bad = bad_chars(current, urule)
        if not bad:
            continue
        decide(urule, (bad[0], bad[-1] + 1), f"{len(bad)} character(s)")
        if urule.mode != "enforce":
            continue
        if urule.action == "block":
            result.text = None
            return result
        if urule.action == "strip":
            drop = set(bad)
            current = "".join(ch for i, ch in enumerate(current) if i not in drop)

    for stage_name in ("input", "output"):
        stage = ps.stages[stage_name]
        if not stage.rules:
            continue
        matcher = Matcher(
            stage,
            [r.index for r in stage.rules],  # every rule, whatever its scope or roles: see the module docstring
            stage_name=stage_name,
            version=ps.version,
            on_decision=result.decisions.append,
        )
        matcher.feed(current)
        matcher.finish()
        if matcher.stopped:
            result.text = None
            return result
        current = matcher.final_text
    result.text = current
    return result
