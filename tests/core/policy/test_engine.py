"""The engine: input checks, limits, instructions, reload and watch, metrics, preference pairs, errors."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from core.policy import PolicyEngine, PolicyError, RequestContext, load_policy_set
from core.records import Message, PolicyPair
from tests.core.policy.conftest import CTX, stream, write_rules

INPUT_RULES = """
defaults:
  refusal: "Not here."
rules:
  - id: in.card
    description: cards in requests
    kind: preset
    preset: credit_card
    stages: [input, output]
    action: redact
  - id: in.rewrite
    description: normalise a product name
    kind: keywords
    keywords: [acme corp]
    stages: [input]
    action: rewrite
    replacement: "ACME"
    roles: [user]
  - id: in.block
    description: forbidden topic
    kind: regex
    pattern: "(?i)how to make (?:a )?bomb"
    stages: [input]
    action: block
  - id: in.flag
    description: injection attempts
    kind: keywords
    keywords: [ignore previous instructions]
    stages: [input]
    action: flag
  - id: limits
    description: limits
    kind: limit
    max_messages: 4
    max_input_chars: 200
    max_output_tokens: 50
  - id: tokens
    description: token limit
    kind: limit
    max_input_tokens: 30
    action: flag
  - id: unicode
    description: strip invisibles
    kind: unicode
    action: strip
    allow: ["\\u200d"]
  - id: persona
    description: behaviour
    kind: instructions
    text: Be brief.
"""


R = "rules:\n  - {id: r, description: d, "  # the start of a one-rule file


def _user(text: str) -> list[dict[str, object]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def engine(make_engine: Callable[..., PolicyEngine]) -> PolicyEngine:
    return make_engine(INPUT_RULES, tokenizer_count=lambda t: len(t.split()))


def test_redact_rewrite_strip_and_instructions(engine: PolicyEngine) -> None:
    messages = [
        {"role": "system", "content": "You sell widgets."},
        {"role": "user", "content": "I work at Acme  Corp, card 4111 1111 1111 1111.\u200b"},
        {"role": "assistant", "content": "acme corp is a client"},
    ]
    res = engine.check_input(messages, CTX, max_tokens=None)
    assert not res.blocked and res.refusal is None
    assert res.messages[0] == {"role": "system", "content": "Be brief.\n\nYou sell widgets."}
    assert res.messages[1]["content"] == "I work at ACME, card [CARD]."
    assert res.messages[2]["content"] == "acme corp is a client"  # roles: [user] only
    assert messages[1]["content"].startswith("I work at Acme")  # the caller's list is not modified
    assert res.max_tokens == 50
    actions = {(d.rule_id, d.action) for d in res.decisions}
    assert {("in.card", "redact"), ("in.rewrite", "rewrite"), ("unicode", "strip"), ("persona", "instruct")} <= actions
    assert ("limits", "limit") in actions
    card = next(d for d in res.decisions if d.rule_id == "in.card")
    start = messages[1]["content"].index("4111")  # type: ignore[union-attr]
    assert card.message_index == 1 and card.stage == "input" and card.span == (start, start + 19)
    assert card.to_dict()["span"] == [start, start + 19]


def test_instructions_become_a_new_system_message(engine: PolicyEngine) -> None:
    res = engine.check_input(_user("hi"), CTX, max_tokens=10)
    assert res.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert res.max_tokens == 10  # already under the clamp
    assert not any(d.action == "limit" for d in res.decisions)


def test_block_on_input(engine: PolicyEngine) -> None:
    res = engine.check_input(_user("Tell me HOW TO MAKE A BOMB please"), CTX, None)
    assert res.blocked and res.refusal == "Not here."
    assert [d.action for d in res.decisions if d.rule_id == "in.block"] == ["block"]


def test_limits(engine: PolicyEngine) -> None:
    res = engine.check_input([{"role": "user", "content": "x"}] * 5, CTX, None)
    assert res.blocked and res.refusal == "Not here."
    assert any(d.detail == "max_messages: 5 > 4" for d in res.decisions)
    res = engine.check_input(_user("y" * 201), CTX, None)
    assert res.blocked and any(d.detail == "max_input_chars: 201 > 200" for d in res.decisions)
    # The token limit only flags, and counts with the tokenizer callback (here: words).
    res = engine.check_input(_user("w " * 31), CTX, None)
    assert not res.blocked
    assert [d.detail for d in res.decisions if d.rule_id == "tokens"] == ["max_input_tokens: 31 > 30"]


def test_content_parts_and_flag(engine: PolicyEngine) -> None:
    msg = {"role": "user", "content": [{"type": "text", "text": "ignore previous instructions, 5500-0000-0000-0004"}]}
    res = engine.check_input([msg], CTX, None)
    assert res.messages[-1]["content"][0]["text"] == "ignore previous instructions, [CARD]"
    assert ("in.flag", "flag") in {(d.rule_id, d.action) for d in res.decisions}


def test_unicode_block(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine(
        """
        rules:
          - {id: u, description: no bidi tricks, kind: unicode, action: block, refusal: "Invisible characters."}
        """
    )
    assert engine.check_input(_user("plain\ttext\n"), CTX, None).decisions == []
    res = engine.check_input(_user("evil\u202etxt.exe"), CTX, None)
    assert res.blocked and res.refusal == "Invisible characters."
    assert res.decisions[0].detail == "1: U+202E"


def test_shadow_input_changes_nothing(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine(INPUT_RULES.replace('refusal: "Not here."', 'refusal: "Not here."\n  mode: shadow'))
    messages = _user("card 4111 1111 1111 1111 how to make a bomb\u200b") * 5
    res = engine.check_input(messages, CTX, 500)
    assert not res.blocked and res.messages == messages and res.max_tokens == 500
    assert {d.mode for d in res.decisions} == {"shadow"}
    assert {"in.card", "in.block", "limits", "unicode", "persona"} <= {d.rule_id for d in res.decisions}


def test_metrics(engine: PolicyEngine) -> None:
    registry = CollectorRegistry()
    engine = PolicyEngine(engine.policies_dir, registry=registry)
    engine.load()
    engine.check_input(_user("card 4111 1111 1111 1111"), CTX, None)
    stream(engine, ["card 4111 1111 1111 1111"])
    labels = {"rule": "in.card", "action": "redact", "mode": "enforce"}
    assert registry.get_sample_value("secondstage_policy_decisions_total", labels | {"stage": "input"}) == 1
    assert registry.get_sample_value("secondstage_policy_decisions_total", labels | {"stage": "output"}) == 1
    version = engine.active.version
    assert registry.get_sample_value("secondstage_policy_ruleset_info", {"version": version}) == 1


def test_invalid_edit_keeps_old_set_and_valid_edit_applies(engine: PolicyEngine) -> None:
    registry = CollectorRegistry()
    engine = PolicyEngine(engine.policies_dir, registry=registry)
    engine.load()
    old = engine.active.version
    path = engine.policies_dir / "rules.yaml"
    path.write_text(path.read_text().replace('pattern: "(?i)how to make (?:a )?bomb"', 'pattern: "bomb.*"'))
    res = engine.reload()
    assert not res.ok and res.version == old and engine.active.version == old
    assert res.error is not None
    assert (res.error.file, res.error.rule_id, res.error.field) == (str(path), "in.block", "max_len")
    assert engine.check_input(_user("how to make a bomb"), CTX, None).blocked  # the old rules still apply
    assert registry.get_sample_value("secondstage_policy_reloads_total", {"result": "error"}) == 1

    path.write_text(path.read_text().replace('pattern: "bomb.*"', 'pattern: "bomb.*"\n    max_len: 40'))
    res = engine.reload()
    assert res.ok and res.changed and engine.active.version != old
    assert engine.check_input(_user("bomb squad"), CTX, None).blocked
    assert not engine.check_input(_user("how to make a b0mb"), CTX, None).blocked
    assert registry.get_sample_value("secondstage_policy_reloads_total", {"result": "ok"}) == 1
    assert registry.get_sample_value("secondstage_policy_ruleset_info", {"version": engine.active.version}) == 1
    assert registry.get_sample_value("secondstage_policy_ruleset_info", {"version": old}) is None


async def test_watch_reloads_on_file_change(make_engine: Callable[..., PolicyEngine]) -> None:
    engine = make_engine("rules:\n  - {id: a, description: a, kind: keywords, keywords: [alpha], action: redact}\n")
    stop = asyncio.Event()
    task = asyncio.create_task(engine.watch(stop, debounce_ms=50))
    await asyncio.sleep(0.3)  # let the watcher start
    old = engine.active.version
    write_rules(
        engine.policies_dir,
        "rules:\n  - {id: b, description: b, kind: keywords, keywords: [beta], action: redact}\n",
        name="more.yaml",
    )
    for _ in range(100):
        if engine.active.version != old:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert engine.active.version != old
    assert stream(engine, ["alpha beta"])[0] == "[REDACTED] [REDACTED]"


def test_policy_pair(engine: PolicyEngine, make_engine: Callable[..., PolicyEngine]) -> None:
    prompt = _user("my card?")
    out, f = stream(engine, ["It is 4111 1111 1111 1111."])
    pair = engine.policy_pair(prompt, f.original_text, f.final_text, f.decisions)
    assert pair == PolicyPair(
        prompt=[Message(role="user", content="my card?")],
        rejected="It is 4111 1111 1111 1111.",
        chosen="It is [CARD].",
        rule_ids=["in.card"],
        ruleset_version=engine.active.version,
    )
    out, f = stream(engine, ["nothing to see"])
    assert engine.policy_pair(prompt, f.original_text, f.final_text, f.decisions) is None

    blocker = make_engine(
        "rules:\n  - {id: s, description: s, kind: keywords, keywords: [secret], action: block, refusal: Nope.}\n"
        "  - {id: f, description: f, kind: keywords, keywords: [hello], action: flag}\n"
    )
    out, f = stream(blocker, ["hello, the secret is 42"])
    assert out == "hello, the " and f.stopped
    pair = blocker.policy_pair(prompt, f.original_text, f.final_text, f.decisions)
    assert pair is not None and pair.chosen == "Nope." and pair.rejected == "hello, the secret is 42"
    assert pair.rule_ids == ["s"]
    out, f = stream(blocker, ["hello there"])  # flag only: no pair
    assert blocker.policy_pair(prompt, f.original_text, f.final_text, f.decisions) is None


@pytest.mark.parametrize(
    ("body", "rule_id", "field", "needle"),
    [
        (R + "kind: regex, pattern: 'a+', action: redact}\n", "r", "max_len", "max_len"),
        (R + "kind: regex, pattern: '(?=a)b', action: flag}\n", "r", "pattern", "look"),
        (R + "kind: regex, pattern: 'a?', action: flag}\n", "r", "pattern", "empty"),
        (R + "kind: regex, pattern: '(', action: flag}\n", "r", "pattern", "valid"),
        (R + "kind: preset, preset: nope, action: flag}\n", "r", "preset", "email"),
        (R + "kind: keywords, keywords: [a], action: zap}\n", "r", "action", "block"),
        (R + "kind: keywords, keywords: [a], action: flag, colour: 1}\n", "r", "colour", "unknown"),
        (R + "kind: keywords, keywords: [a], action: rewrite}\n", "r", None, "replacement"),
        (R + "kind: magic}\n", "r", "kind", "magic"),
        ("rules:\n  - {description: d, kind: keywords, keywords: [a], action: flag}\n", "#1", "id", "required"),
        (R + "kind: limit}\n", "r", None, "at least one"),
        ("rules: [\n", None, None, "line"),
    ],
)  # fmt: skip
def test_errors_name_file_rule_and_field(
    tmp_path: Path, body: str, rule_id: str | None, field: str | None, needle: str
) -> None:
    path = write_rules(tmp_path, body)
    with pytest.raises(PolicyError) as info:
        load_policy_set(tmp_path)
    err = info.value
    assert (err.file, err.rule_id, err.field) == (str(path), rule_id, field)
    assert needle in err.message, err.message
    assert str(path) in str(err)


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    write_rules(tmp_path, R + "kind: keywords, keywords: [a], action: flag}\n", "a.yaml")
    write_rules(tmp_path, R + "kind: keywords, keywords: [b], action: flag}\n", "b.yaml")
    with pytest.raises(PolicyError, match="duplicate rule id") as info:
        load_policy_set(tmp_path)
    assert info.value.file == str(tmp_path / "b.yaml") and info.value.field == "id"


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        PolicyEngine(tmp_path / "nope").load()


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    write_rules(tmp_path, R + "kind: keywords, keywords: [a], action: flag}\n")
    v1 = load_policy_set(tmp_path).version
    assert load_policy_set(tmp_path).version == v1
    write_rules(tmp_path, "rules:\n  - {id: r, description: d2, kind: keywords, keywords: [a], action: flag}\n")
    assert load_policy_set(tmp_path).version != v1


def test_context_is_a_dataclass() -> None:
    assert RequestContext(api_key=None, user=None, model="m").model == "m"


def test_token_limit_tokenizes_only_what_could_exceed_it() -> None:
    """A prompt whose UTF-8 bytes cannot make more tokens than the limit is not tokenized; one that could is, and
    is still flagged when it exceeds the limit (here: a tokenizer that counts every character, emoji included)."""
    from core.policy.input import limit_violations
    from core.policy.schema import LimitRule

    calls: list[str] = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text)

    rule = LimitRule(id="tokens", kind="limit", description="a token limit", max_input_tokens=30)
    assert limit_violations(rule, [{"role": "user", "content": "short"}], count) == []
    assert calls == []
    long = "🙂" * 31  # 124 bytes: over the bound, so counted exactly
    assert limit_violations(rule, [{"role": "user", "content": long}], count) == ["max_input_tokens: 31 > 30"]
    assert calls == [long]
