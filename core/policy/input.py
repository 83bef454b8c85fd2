"""The input stage: what the rules do to a request's messages before the model sees them.

In order: limits (on what the client sent), invisible and control characters, keyword/regex/preset
rules message by message, then the operators' instructions as one system message at the front.
An enforced block stops the pipeline and answers with the rule's refusal; the blocked request's
messages are then replaced by one `withheld_input` marker naming the rule, so what a rule blocked
(and whatever later rules would have redacted) is never stored. The decisions keep the rule, the
message index, the span and the limit's numbers.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from core.policy.loading import PolicySet
from core.policy.results import Decision, InputResult
from core.policy.schema import InstructionsRule, LimitRule, UnicodeRule, refusal_for
from core.policy.scope import RequestContext, active_indices, in_scope
from core.policy.stream import Matcher

_KEEP_CONTROLS = frozenset("\t\n\r")
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x20-\x7e]")


def _text_parts(message: dict[str, Any]) -> list[tuple[Any, str]]:
    """(key, text) for each text piece of a message: key "content" or an index into a parts list."""
    content = message.get("content")
    if isinstance(content, str):
        return [("content", content)]
    if isinstance(content, list):
        return [
            (i, p["text"])
            for i, p in enumerate(content)
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    return []


def _set_text(message: dict[str, Any], key: Any, text: str) -> None:
    if key == "content":
        message["content"] = text
    else:
        message["content"][key]["text"] = text


def bad_chars(text: str, rule: UnicodeRule) -> list[int]:
    """Indices of characters the unicode rule catches."""
    if text.isascii() and "Cc" not in rule.categories:
        return []
    cats = set(rule.categories)
    allow = set(rule.allow)
    out = []
    # Only characters outside printable ASCII can be caught: the regex finds them in C (a loop over every
    # character in Python was ~3% of a short request's API-process CPU with the default `Cc` rule).
    for m in _NOT_PRINTABLE_ASCII.finditer(text):
        ch = m.group()
        if ch in allow or ch in _KEEP_CONTROLS:
            continue
        if unicodedata.category(ch) in cats:
            out.append(m.start())
    return out


def withheld_input(rule_id: str) -> list[dict[str, Any]]:
    """What a blocked request's messages become: one marker, never the text that was blocked."""
    return [{"role": "user", "content": f"[withheld: input blocked by rule {rule_id}]"}]


def _token_bound(texts: list[str]) -> int:
    """An upper bound on the tokens of `texts` without tokenizing: UTF-8 bytes + 1 per text.

    Byte-level BPE never makes more tokens than bytes, SentencePiece with byte fallback at most one per byte
    plus a leading "▁". Tokenizing every prompt a second time only to compare it with a limit it is far under
    cost 8% of the API process at one output token per request (py-spy, bench c64-o1); the exact count runs
    only when this bound exceeds the limit.
    """
    return sum(len(t.encode("utf-8", "surrogatepass")) + 1 for t in texts)


def limit_violations(
    rule: LimitRule, msgs: list[dict[str, Any]], tokenizer_count: Callable[[str], int] | None = None
) -> list[str]:
    """One line per input limit of `rule` that `msgs` exceed, e.g. "max_messages: 120 > 100"."""
    out = []
    if rule.max_messages is not None and len(msgs) > rule.max_messages:
        out.append(f"max_messages: {len(msgs)} > {rule.max_messages}")
    texts = [t for m in msgs for _k, t in _text_parts(m)]
    if rule.max_input_chars is not None:
        chars = sum(len(t) for t in texts)
        if chars > rule.max_input_chars:
            out.append(f"max_input_chars: {chars} > {rule.max_input_chars}")
    if rule.max_input_tokens is not None and _token_bound(texts) > rule.max_input_tokens:
        # Without a tokenizer, ~4 characters per token is the usual estimate for English text.
        count = tokenizer_count or (lambda t: (len(t) + 3) // 4)
        tokens = sum(count(t) for t in texts)
        if tokens > rule.max_input_tokens:
            out.append(f"max_input_tokens: {tokens} > {rule.max_input_tokens}")
    return out


def check_input(
    ps: PolicySet,
    messages: list[dict[str, Any]],
    ctx: RequestContext,
    max_tokens: int | None = None,
    *,
    on_decision: Callable[[Decision], None] | None = None,
    tokenizer_count: Callable[[str], int] | None = None,
) -> InputResult:
    """Apply the set's limits, unicode, match and instruction rules to a request's messages (a copy).

    `on_decision` sees every decision as it is made (the engine counts them); the result lists them.
    """
    decisions: list[Decision] = []

    def record(d: Decision) -> None:
        decisions.append(d)
        if on_decision is not None:
            on_decision(d)

    msgs = copy.deepcopy(messages)

    def decide(rule: Any, action: str, **kw: Any) -> Decision:
        d = Decision(
            rule_id=rule.id, kind=rule.kind, action=action, mode=rule.mode, stage="input",
            ruleset_version=ps.version, **kw,
        )  # fmt: skip
        record(d)
        return d

    def blocked(rule: Any) -> InputResult:
        # Not `msgs`: a block returns before later messages were checked and redacted.
        return InputResult(withheld_input(rule.id), True, refusal_for(rule), max_tokens, decisions, ps.version)

    # Per kind, not over every rule: with 1,000 keyword rules a pass over all of them cost ~0.3 ms per request.
    def applying(kind: type[Any]) -> list[Any]:
        return [r for r in ps.of_kind(kind) if in_scope(r, ctx)]

    # 1. Limits, on what the client sent.
    for rule in applying(LimitRule):
        violations = limit_violations(rule, msgs, tokenizer_count)
        for detail in violations:
            decide(rule, rule.action, detail=detail)
        if violations and rule.mode == "enforce" and rule.action == "block":
            return blocked(rule)
        if rule.max_output_tokens is not None and (max_tokens is None or max_tokens > rule.max_output_tokens):
            decide(rule, "limit", detail=f"max_tokens {max_tokens} -> {rule.max_output_tokens}")
            if rule.mode == "enforce":
                max_tokens = rule.max_output_tokens

    # 2. Invisible and control characters.
    for urule in applying(UnicodeRule):
        for mi, message in enumerate(msgs):
            for key, text in _text_parts(message):
                bad = bad_chars(text, urule)
                if not bad:
                    continue
                shown = ", ".join(sorted({f"U+{ord(text[i]):04X}" for i in bad})[:8])
                decide(urule, urule.action, message_index=mi, span=(bad[0], bad[-1] + 1), detail=f"{len(bad)}: {shown}")
                if urule.mode != "enforce":
                    continue
                if urule.action == "block":
                    return blocked(urule)
                if urule.action == "strip":
                    drop = set(bad)
                    _set_text(message, key, "".join(ch for i, ch in enumerate(text) if i not in drop))

    # 3. Keyword, regex and preset rules, message by message.
    stage = ps.stages["input"]
    if stage.rules:
        for mi, message in enumerate(msgs):
            active = active_indices(stage, ctx, role=str(message.get("role", "")))
            if not active:
                continue
            for key, text in _text_parts(message):
                m = Matcher(stage, active, stage_name="input", version=ps.version, on_decision=record, message_index=mi)
                m.feed(text)
                m.finish()
                if m.stopped:
                    block = next(d for d in reversed(m.decisions) if d.action == "block")
                    return InputResult(
                        withheld_input(block.rule_id), True, m.refusal, max_tokens, decisions, ps.version
                    )
                if m.final_text != text:
                    _set_text(message, key, m.final_text)

    # 4. Operator instructions: one system message at the front (chat templates want at most one).
    texts = []
    for irule in applying(InstructionsRule):
        decide(irule, "instruct")
        if irule.mode == "enforce":
            texts.append(irule.text.strip())
    if texts:
        text = "\n\n".join(texts)
        if msgs and msgs[0].get("role") == "system" and isinstance(msgs[0].get("content"), str):
            msgs[0]["content"] = text + "\n\n" + msgs[0]["content"]
        else:
            msgs.insert(0, {"role": "system", "content": text})
    return InputResult(msgs, False, None, max_tokens, decisions, ps.version)
