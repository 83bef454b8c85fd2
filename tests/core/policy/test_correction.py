"""`check_correction`: a user's correction through every rule before it may become a training answer."""

from __future__ import annotations

from collections.abc import Callable

from core.policy import PolicyEngine

RULES = """
version: 1
rules:
  - id: in.card
    description: Card numbers in what users send.
    kind: preset
    preset: credit_card
    stages: [input]
    action: redact
  - id: out.email
    description: E-mail addresses in what the model says, only for one key (scope).
    kind: preset
    preset: email
    stages: [output]
    action: redact
    scope: {api_keys: ["some-other-key"]}
  - id: out.rude
    description: Rewrites.
    kind: keywords
    keywords: [fool]
    stages: [output]
    action: rewrite
    replacement: friend
  - id: out.codename
    description: Never taught.
    kind: keywords
    keywords: [nightjar]
    stages: [output]
    action: block
  - id: out.ip
    description: Only recorded.
    kind: preset
    preset: ipv4
    stages: [output]
    action: flag
  - id: out.shadow
    description: Measured before enforcing.
    kind: keywords
    keywords: [maybe]
    stages: [output]
    action: redact
    mode: shadow
  - id: in.invisible
    description: Strip zero-width characters.
    kind: unicode
    action: strip
    categories: [Cf]
"""


def test_every_stage_applies_whatever_the_scope(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine(RULES)
    checked = engine.check_correction("Pay with 4111 1111 1111 1111, mail ann@example.com, you f\u200bool.")
    assert checked.text == "Pay with [CARD], mail [EMAIL], you friend."
    assert checked.changed and checked.blocked_by is None
    assert [(d.rule_id, d.stage) for d in checked.decisions] == [
        ("in.invisible", "input"),
        ("in.card", "input"),
        ("out.email", "output"),
        ("out.rude", "output"),
    ]
    assert {d.ruleset_version for d in checked.decisions} == {engine.active.version}


def test_a_block_rule_makes_it_untrainable(make_engine: Callable[..., PolicyEngine]) -> None:
    checked = make_engine(RULES).check_correction("The Nightjar launch is on Monday.")
    assert checked.text is None and checked.blocked_by == "out.codename"


def test_flag_and_shadow_rules_only_record(make_engine: Callable[..., PolicyEngine]) -> None:
    checked = make_engine(RULES).check_correction("Maybe use 10.0.0.1.")
    assert checked.text == "Maybe use 10.0.0.1." and not checked.changed
    assert {(d.rule_id, d.mode) for d in checked.decisions} == {("out.ip", "enforce"), ("out.shadow", "shadow")}


def test_a_clean_correction_is_unchanged(make_engine: Callable[..., PolicyEngine]) -> None:
    checked = make_engine(RULES).check_correction("The sky is blue.")
    assert checked.text == "The sky is blue." and checked.decisions == []
