"""The output filter: every action on whole and streamed text, splits anywhere give the same result."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from core.policy import PolicyEngine
from tests.core.policy.conftest import CTX, stream, write_rules

RULES = """
rules:
  - id: email
    description: emails
    kind: preset
    preset: email
    action: redact
  - id: card
    description: cards
    kind: preset
    preset: credit_card
    action: redact
  - id: key
    description: keys
    kind: preset
    preset: openai_key
    action: redact
  - id: pk
    description: private keys
    kind: preset
    preset: private_key
    action: redact
  - id: ssn
    description: ssn
    kind: preset
    preset: us_ssn
    action: redact
    tag: "<ssn>"
  - id: words
    description: swap a word
    kind: keywords
    keywords: [colour, "grey area"]
    action: rewrite
    replacement: "COLOR"
  - id: ip
    description: ips
    kind: preset
    preset: ipv4
    action: flag
  - id: shadow-word
    description: shadowed block
    kind: keywords
    keywords: [banana]
    action: block
    mode: shadow
  - id: ticket
    description: ticket ids
    kind: regex
    pattern: "TCK-[0-9]+"
    max_len: 12
    action: redact
    tag: "[TICKET]"
  - id: stop
    description: forbidden word stops the response
    kind: keywords
    keywords: [frobnicate]
    action: block
    refusal: "I can't continue."
"""

TEXT = (
    "Hi bob.smith@example.com, your card 4111 1111 1111 1111 is on file (not 4111 1111 1111 1112). "
    "Key sk-proj-abcdefghijklmnopqrstuvwxyz0123 and SSN 123-45-6789; the colour is in a grey  area. "
    "Server 10.0.0.7 said banana. Ticket TCK-123456789012345 closed.\n"
    "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEA\n-----END PRIVATE KEY-----\nbye"
)
EXPECTED = (
    "Hi [EMAIL], your card [CARD] is on file (not 4111 1111 1111 1112). "
    "Key [SECRET] and SSN <ssn>; the COLOR is in a COLOR. "
    "Server 10.0.0.7 said banana. Ticket [TICKET]345 closed.\n"
    "[PRIVATE KEY]\nbye"
)


def _loaded(tmp_path_factory: pytest.TempPathFactory, name: str, rules: str) -> PolicyEngine:
    """An engine over `rules` in a fresh directory, loaded (the module fixtures compile once each)."""
    directory = tmp_path_factory.mktemp(name)
    write_rules(directory, rules)
    engine = PolicyEngine(directory, registry=CollectorRegistry())
    engine.load()
    return engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    # One compile for the module: the private-key pattern takes most of a second.
    return _loaded(tmp_path_factory, "policies", RULES)


@pytest.fixture(scope="module")
def changing_only(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    """RULES without its flag and shadow rules: a stage with one group (the matcher's one-group path)."""
    rules = RULES.split("\n  - ")
    text = "\n  - ".join(r for r in rules if "action: flag" not in r and "mode: shadow" not in r)
    engine = _loaded(tmp_path_factory, "changing-only", text)
    assert not engine.active.stages["output"].record_only and len(engine.active.stages["output"].rules) == 8
    return engine


def _reference(engine: PolicyEngine, text: str) -> str:
    """The spec, written independently: Python finditer per rule on the whole text, applied by start."""
    return _reference_with_decisions(engine, text)[0]


def _reference_with_decisions(engine: PolicyEngine, text: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The spec's text and its decisions (rule id, start, end): every match in order of (start, rule, end), up to
    and including the block that stops the text."""
    stage = engine.active.stages["output"]
    matches = []
    for r in stage.rules:
        for m in r.python.finditer(text):
            if r.validate is None or r.validate(m.group()):
                matches.append((m.start(), r.index, m.end()))
    out, done, decisions = [], 0, []
    for start, i, end in sorted(matches):
        rule = stage.rules[i].rule
        decisions.append((rule.id, start, end))
        if rule.mode == "shadow" or rule.action == "flag":
            continue
        if start > done:
            out.append(text[done:start])
            done = start
        if rule.action == "block":
            return "".join(out), decisions
        if end <= done:
            continue
        if start >= done:
            out.append(stage.rules[i].tag if rule.action == "redact" else rule.replacement)
        done = end
    out.append(text[done:])
    return "".join(out), decisions


def _decisions(f: object) -> list[tuple[str, int, int]]:
    return [(d.rule_id, *d.span) for d in f.decisions]  # type: ignore[attr-defined]


def _random_split(text: str, rng: random.Random, most: int = 40) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, most))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_every_action_whole_text(engine: PolicyEngine) -> None:
    out, f = stream(engine, [TEXT])
    assert out == EXPECTED
    assert f.final_text == EXPECTED and f.original_text == TEXT
    by_rule: dict[str, list[str]] = {}
    for d in f.decisions:
        by_rule.setdefault(d.rule_id, []).append(d.action)
    assert by_rule["email"] == ["redact"]
    assert by_rule["card"] == ["redact"]  # the Luhn-invalid number is not a decision
    assert by_rule["words"] == ["rewrite", "rewrite"]
    assert by_rule["ip"] == ["flag"]
    assert by_rule["shadow-word"] == ["block"]
    assert all(d.mode == "shadow" for d in f.decisions if d.rule_id == "shadow-word")
    email = next(d for d in f.decisions if d.rule_id == "email")
    assert TEXT[email.span[0] : email.span[1]] == "bob.smith@example.com"
    assert email.stage == "output" and email.ruleset_version == engine.active.version


def test_one_char_deltas_give_the_same_text(engine: PolicyEngine) -> None:
    out, f = stream(engine, list(TEXT))
    assert out == EXPECTED
    assert [d.rule_id for d in f.decisions] == [d.rule_id for d in stream(engine, [TEXT])[1].decisions]


def test_every_two_piece_split_gives_the_same_text(engine: PolicyEngine) -> None:
    for i in range(1, len(TEXT)):
        assert stream(engine, [TEXT[:i], TEXT[i:]])[0] == EXPECTED, i


@pytest.mark.parametrize("which", ["engine", "changing_only"])
def test_random_splits_of_random_texts_match_the_reference(which: str, request: pytest.FixtureRequest) -> None:
    engine = request.getfixturevalue(which)
    rng = random.Random(1234)
    pieces = [
        "a@b.co", "x.y+z@mail.example.org", "4111 1111 1111 1111", "5500-0000-0000-0004", "4111111111111112",
        "sk-abcdefghijklmnopqrstuvwxyz", "123-45-6789", "colour", "grey\narea", "banana", "TCK-99", "TCK-1234567890123",
        "10.1.2.3", "frobnicate", "frobnicated", " ", "  ", "\n", ".", "@", "-", "word", "é", "日本", "sk-", "4111",
    ]  # fmt: skip
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 25)))
        want, decisions = _reference_with_decisions(engine, text)
        assert stream(engine, [text])[0] == want, text
        for _ in range(3):
            out, f = stream(engine, _random_split(text, rng))
            assert (out, _decisions(f)) == (want, decisions), text


def test_a_secret_in_one_char_deltas_is_never_emitted(engine: PolicyEngine) -> None:
    secret = "sk-proj-abcdefghijklmnopqrstuvwxyz0123"
    text = f"here: {secret} done"
    f = engine.output_filter(CTX)
    emitted = ""
    for ch in text:
        emitted += f.feed(ch).emit
        # Not even a prefix of the key may leave while the key is still being written.
        assert "sk-p" not in emitted
    emitted += f.finish().emit
    assert emitted == "here: [SECRET] done"


def test_match_across_the_hold_back_boundary(engine: PolicyEngine) -> None:
    hold = engine.active.hold_back
    filler = "lorem ipsum " * (hold // 12 + 5)
    for offset in (hold - 3, hold, hold + 1, hold + 7):
        text = filler[:offset] + " card 4111-1111-1111-1111 end"
        chunk = max(1, hold // 3)
        chunks = [text[i : i + chunk] for i in range(0, len(text), chunk)]
        assert stream(engine, chunks)[0] == filler[:offset] + " card [CARD] end"


def test_hold_back_only_while_a_pattern_could_match(engine: PolicyEngine) -> None:
    f = engine.output_filter(CTX)
    assert f.feed("Hello there, friend. ").emit == "Hello there, friend. "
    # "wor" could still be the start of an email address: held; the space ends it.
    assert f.feed("wor").emit == ""
    assert f.feed("ld ").emit == "world "
    assert f.feed("4111 1111").emit == ""  # could be a card number
    assert f.feed(" is a code!").emit == "4111 1111 is a code!"
    assert f.finish().emit == ""


def test_block_stops_before_the_match(engine: PolicyEngine) -> None:
    text = "Sure. To frobnicate the widget, first"
    for chunks in ([text], list(text)):
        out, f = stream(engine, chunks)
        assert out == "Sure. To "
        assert f.stopped and f.refusal == "I can't continue."
        assert [d.action for d in f.decisions if d.rule_id == "stop"] == ["block"]
    f = engine.output_filter(CTX)
    step = f.feed(text + " more")
    assert step.stopped and step.emit == "Sure. To " and step.refusal == "I can't continue."
    assert f.feed(" and more").emit == ""
    assert f.finish().stopped


def test_step_text_carries_the_refusal_once(engine: PolicyEngine) -> None:
    # What a caller sends is the steps' `text`: the filter, not each caller, appends the refusal.
    text = "Sure. To frobnicate the widget, first"
    for chunks in ([text], list(text)):
        f = engine.output_filter(CTX)
        steps = [f.feed(c) for c in chunks] + [f.feed(" more"), f.finish()]
        assert "".join(s.text for s in steps) == "Sure. To I can't continue."
        assert sum(s.blocked_here for s in steps) == 1
    # A block found only at the end of the text comes with finish().
    f = engine.output_filter(CTX)
    first, end = f.feed("ok frobnicat"), f.finish()
    assert (first.text, first.stopped) == ("ok ", False)
    assert f.stopped is False and end.text == "frobnicat"
    f = engine.output_filter(CTX)
    first, end = f.feed("ok frobnicate"), f.finish()
    assert (first.text, end.text, end.blocked_here) == ("ok ", "I can't continue.", True)
    # Without a block, text is what the filter emits.
    f = engine.output_filter(CTX)
    steps = [f.feed("mail bob@example.com"), f.finish()]
    assert "".join(s.text for s in steps) == f.final_text == "mail [EMAIL]"


def test_whole_word_keywords(engine: PolicyEngine) -> None:
    assert stream(engine, ["frobnicated is fine"])[0] == "frobnicated is fine"
    assert stream(engine, list("x frobnicate"))[0] == "x "


def test_shadow_changes_nothing_but_records(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine(
        """
        defaults:
          mode: shadow
        rules:
          - {id: e, description: emails, kind: preset, preset: email, action: redact}
          - {id: k, description: stop, kind: keywords, keywords: [stop], action: block}
        """
    )
    text = "mail a@b.co then stop here"
    for chunks in ([text], list(text)):
        out, f = stream(engine, chunks)
        assert out == text and not f.stopped
        got = [(d.rule_id, d.action, d.mode) for d in f.decisions]
        assert got == [("e", "redact", "shadow"), ("k", "block", "shadow")]
        assert [d.span for d in f.decisions] == [(5, 11), (17, 21)]
    # Nor does it delay the text: every delta goes out in the step it arrived, even inside the address.
    f = engine.output_filter(CTX)
    assert [f.feed(c).emit for c in ("mail jane.do", "e@example", ".com", " now")] == [
        "mail jane.do",
        "e@example",
        ".com",
        " now",
    ]
    # The decision is recorded once it is final (the space ends the address), before finish().
    assert [(d.rule_id, d.span, d.mode) for d in f.decisions] == [("e", (5, 25), "shadow")]
    assert f.finish().emit == "" and len(f.decisions) == 1


def test_scope_globs(make_engine: Callable[..., PolicyEngine]) -> None:
    from core.policy import RequestContext

    engine = make_engine(
        """
        rules:
          - id: by-model
            description: only demo models
            kind: keywords
            keywords: [alpha]
            action: redact
            scope: {models: ["demo*"]}
          - id: by-user
            description: only team users
            kind: keywords
            keywords: [beta]
            action: redact
            scope: {users: ["team-*"], api_keys: ["sk-live-*"]}
        """
    )
    text = "alpha beta"
    assert stream(engine, [text], RequestContext(None, None, "demo-v2"))[0] == "[REDACTED] beta"
    assert stream(engine, [text], RequestContext(None, None, "other"))[0] == "alpha beta"
    assert stream(engine, [text], RequestContext("sk-live-1", "team-a", "other"))[0] == "alpha [REDACTED]"
    assert stream(engine, [text], RequestContext("sk-test-1", "team-a", "other"))[0] == "alpha beta"
    assert stream(engine, [text], RequestContext("sk-live-1", None, "other"))[0] == "alpha beta"


def test_unicode_text_and_offsets(engine: PolicyEngine) -> None:
    text = "日本語 é mail: ünï@x.io? no — ok@exämple.com and plain@example.com."
    want = _reference(engine, text)
    assert stream(engine, list(text))[0] == want == stream(engine, [text])[0]
    _, f = stream(engine, [text])
    spans = [text[d.span[0] : d.span[1]] for d in f.decisions if d.rule_id == "email"]
    assert "plain@example.com" in spans


def test_long_stream_stays_linear(engine: PolicyEngine) -> None:
    text = ("The quick brown fox jumps over the lazy dog. " * 2000) + "a@b.co"
    out, _ = stream(engine, re.findall(r".{1,4}", text, re.S))
    assert out.endswith("dog. [EMAIL]") and len(out) == len(text) - len("a@b.co") + len("[EMAIL]")


RECORD_ONLY_RULES = """
rules:
  - {id: email, description: e, kind: preset, preset: email, action: flag}
  - {id: card, description: c, kind: preset, preset: credit_card, action: redact, mode: shadow}
  - {id: key, description: k, kind: preset, preset: openai_key, action: flag}
  - {id: ssn, description: s, kind: preset, preset: us_ssn, action: redact, mode: shadow}
  - {id: words, description: w, kind: keywords, keywords: [colour, "grey area"], action: rewrite,
     replacement: COLOR, mode: shadow}
  - {id: ticket, description: t, kind: regex, pattern: "TCK-[0-9]+", max_len: 12, action: flag}
  - {id: stop, description: s, kind: keywords, keywords: [frobnicate], action: block, mode: shadow}
"""

# Record-only rules beside rules that change text, overlapping them; `note` can grow across the block.
MIXED_RULES = """
rules:
  - {id: email, description: e, kind: preset, preset: email, action: redact}
  - {id: note, description: n, kind: regex, pattern: "note:[a-z ]{1,40}", action: flag}
  - {id: stop, description: s, kind: keywords, keywords: [frobnicate], action: block}
  - {id: phone, description: p, kind: preset, preset: phone, action: flag}
  - {id: card, description: c, kind: preset, preset: credit_card, action: redact, mode: shadow}
  - {id: words, description: w, kind: keywords, keywords: [colour], action: rewrite, replacement: COLOR}
  - {id: shade, description: s, kind: keywords, keywords: [colour, "our"], action: flag}
  - {id: mail-watch, description: m, kind: preset, preset: email, action: block, mode: shadow}
  - {id: quote, description: q, kind: regex, pattern: "<<[^>]{0,60}>>", action: flag}
"""

PIECES = [
    "a@b.co", "x.y+z@mail.example.org", "4111 1111 1111 1111", "4111111111111112", "(555) 123-4567",
    "sk-abcdefghijklmnopqrstuvwxyz", "123-45-6789", "colour", "grey area", "TCK-99", "TCK-1234567890123",
    "note: ", "note:", "frobnicate", "frobnicated", "our", " ", "  ", "\n", ".", "@", "-", "word", "é", "日本", "4111",
    "<<", ">>", ">",
]  # fmt: skip


@pytest.fixture(scope="module")
def record_only(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    return _loaded(tmp_path_factory, "record-only", RECORD_ONLY_RULES)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    return _loaded(tmp_path_factory, "mixed", MIXED_RULES)


def test_record_only_rules_never_hold_the_stream_back(record_only: PolicyEngine) -> None:
    stage = record_only.active.stages["output"]
    assert stage.record_only == frozenset(range(len(stage.rules))) and stage.hold_back == 0
    # The case: before, each delta went out one step late ("", "The ", "sky ").
    f = record_only.output_filter(CTX)
    assert [f.feed(c).emit for c in ("The", " sky", " is")] == ["The", " sky", " is"]
    rng = random.Random(77)
    for _ in range(150):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))
        want, decisions = _reference_with_decisions(record_only, text)
        assert want == text  # nothing here changes text
        for chunks in ([text], _random_split(text, rng) if len(text) > 1 else [text], list(text)):
            f = record_only.output_filter(CTX)
            for c in chunks:
                step = f.feed(c)
                assert (step.emit, step.stopped) == (c, False), (text, chunks)
            assert f.finish().emit == ""
            assert _decisions(f) == decisions, (text, chunks)
            assert all(d.mode == "shadow" or d.action == "flag" for d in f.decisions)


def test_mixed_stage_redacts_and_records_across_every_split(mixed: PolicyEngine) -> None:
    text = "note: mail a@b.co, call (555) 123-4567 re colour; card 4111 1111 1111 1111 ok. bye"
    want, decisions = _reference_with_decisions(mixed, text)
    assert want == "note: mail [EMAIL], call (555) 123-4567 re COLOR; card 4111 1111 1111 1111 ok. bye"
    spans = {(rule, text[a:b]) for rule, a, b in decisions}
    assert {("email", "a@b.co"), ("mail-watch", "a@b.co"), ("phone", "(555) 123-4567"), ("words", "colour")} <= spans
    assert {("shade", "colour"), ("card", "4111 1111 1111 1111"), ("note", "note: mail a")} <= spans
    splits = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for chunks in splits:
        out, f = stream(mixed, chunks)
        assert (out, _decisions(f)) == (want, decisions), chunks
    rng = random.Random(5)
    for _ in range(200):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))
        want, decisions = _reference_with_decisions(mixed, text)
        for chunks in ([text], _random_split(text, rng) if len(text) > 1 else [text], list(text)):
            out, f = stream(mixed, chunks)
            assert (out, _decisions(f)) == (want, decisions), (text, chunks)


def test_mixed_stage_holds_back_only_for_rules_that_change_text(mixed: PolicyEngine) -> None:
    f = mixed.output_filter(CTX)
    # "(555) " could still become a phone number, but `phone` only flags: it goes out at once.
    assert f.feed("call (555) ").emit == "call (555) "
    assert f.feed("123-4567 or ").emit == "123-4567 or "
    # "jane.do" could become an email address, which `email` redacts: held, as before.
    assert f.feed("jane.do").emit == ""
    assert f.feed("e@example.com ").emit == "[EMAIL] "
    assert f.finish().emit == ""
    assert [(d.rule_id, d.span) for d in f.decisions] == [
        ("phone", (5, 19)),
        ("email", (23, 43)),
        ("mail-watch", (23, 43)),
    ]


def test_a_block_waits_for_a_record_only_match_growing_across_it(mixed: PolicyEngine) -> None:
    # `note` matches from "note:" on, across "frobnicate": its span must not depend on where the stream stopped.
    text = "note: we frobnicate the widget"
    want, decisions = _reference_with_decisions(mixed, text)
    assert want == "note: we " and decisions == [("note", 0, len(text)), ("stop", 9, 19)]
    f = mixed.output_filter(CTX)
    emitted = ""
    for ch in text:
        step = f.feed(ch)
        emitted += step.emit
        assert not step.stopped  # `note` is still growing: the stop waits for it ...
    assert emitted == "note: we "  # ... but the text before the block was not held back for it
    end = f.finish()
    assert end.blocked_here and end.text == "I can't help with that request."
    assert _decisions(f) == decisions


def test_an_abandoned_stream_lists_every_change_it_sent(mixed: PolicyEngine) -> None:
    # `quote` (flag) may still be growing over the address: its decision waits, and the redaction, which sorts
    # after it, waits for its turn. The record of a response the client abandoned now must still list the
    # redaction (serve withholds its span from the stored original text).
    seen: list[str] = []
    f = mixed.output_filter(CTX)
    f._m._on_decision = lambda d: seen.append(d.rule_id)  # type: ignore[attr-defined]
    assert f.feed("<<mail a@b.co ").emit == "<<mail [EMAIL] "
    # (`mail-watch`, record-only too, is not final yet: a record-only match may still be growing from 0.)
    assert [(d.rule_id, d.span) for d in f.decisions] == [("email", (7, 13))]
    assert seen == []  # not recorded yet: `quote` may still match from 0
    f.close()
    assert seen == ["email"] and len(f.decisions) == 1
    # Finished, the quote comes first, as in the whole-text run.
    text = "<<mail a@b.co >> ok"
    _, f = stream(mixed, list(text))
    assert (
        _decisions(f)
        == _reference_with_decisions(mixed, text)[1]
        == [
            ("quote", 0, 16),
            ("email", 7, 13),
            ("mail-watch", 7, 13),
        ]
    )
