"""The policy engine: loads `policies/*.yaml`, checks requests and filters responses, reloads safely.

The chat service builds one `PolicyEngine` at startup, calls `check_input()` before the model
and `output_filter()` per choice after it, stores every `Decision` with the completion record,
and turns blocked or redacted outputs into preference pairs with `policy_pair()`. A reload
parses, validates and compiles the new files completely before swapping them in; on any error
the last good set stays active.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from core.records import Message, PolicyPair
from serve.policy.compiler import CompiledStage, MatchRuleModel, compile_stage
from serve.policy.errors import PolicyError
from serve.policy.schema import (
    DEFAULT_REFUSAL,
    MATCH_KINDS,
    InstructionsRule,
    LimitRule,
    Rule,
    RuleFile,
    UnicodeRule,
)
from serve.policy.stream import Decision, Matcher, OutputFilter

log = logging.getLogger("secondstage.policy")

_KEEP_CONTROLS = frozenset("\t\n\r")


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: what scope globs are matched against."""

    api_key: str | None
    user: str | None
    model: str


@dataclass
class PolicySet:
    """One loaded, compiled rule set. Immutable once built; a reload builds a new one."""

    version: str  # content hash of every rule file (name and bytes)
    rules: list[Any]  # rule models, in order: files by name, rules in file order
    rule_files: dict[str, str]  # rule id -> file it came from
    stages: dict[str, CompiledStage]
    files: list[str]

    @property
    def hold_back(self) -> int:
        """Most characters the output filter can hold back (the widest output pattern)."""
        return self.stages["output"].hold_back

    def rule(self, rule_id: str) -> Any | None:
        return next((r for r in self.rules if r.id == rule_id), None)

    def summary(self) -> list[dict[str, Any]]:
        out = []
        for r in self.rules:
            item: dict[str, Any] = {
                "id": r.id,
                "kind": r.kind,
                "action": r.action,
                "mode": r.mode,
                "stages": list(r.stages),
                "description": r.description,
                "file": self.rule_files[r.id],
            }
            if r.scope is not None:
                item["scope"] = r.scope.model_dump(exclude_none=True)
            out.append(item)
        return out


@dataclass
class ReloadResult:
    ok: bool
    version: str  # the version active after the attempt
    previous_version: str | None
    error: PolicyError | None = None

    @property
    def changed(self) -> bool:
        return self.ok and self.version != self.previous_version


@dataclass
class InputResult:
    messages: list[dict[str, Any]]
    blocked: bool
    refusal: str | None
    max_tokens: int | None
    decisions: list[Decision]
    ruleset_version: str


@dataclass
class _Metrics:
    decisions: Counter
    reloads: Counter
    info: Gauge
    versions: set[str] = field(default_factory=set)

    @classmethod
    def create(cls, registry: CollectorRegistry) -> _Metrics:
        return cls(
            decisions=Counter(
                "secondstage_policy_decisions",
                "Policy decisions, by rule, action, mode and stage.",
                ["rule", "action", "mode", "stage"],
                registry=registry,
            ),
            reloads=Counter(
                "secondstage_policy_reloads",
                "Policy reload attempts, by result (ok|error).",
                ["result"],
                registry=registry,
            ),
            info=Gauge(
                "secondstage_policy_ruleset_info",
                "The active policy rule set (value 1).",
                ["version"],
                registry=registry,
            ),
        )

    def set_version(self, version: str) -> None:
        for old in self.versions - {version}:
            self.info.remove(old)
        self.versions = {version}
        self.info.labels(version=version).set(1)


# -- loading --------------------------------------------------------------------------------


def _rule_files(policies_dir: Path) -> list[Path]:
    if not policies_dir.is_dir():
        raise PolicyError(f"policies directory {str(policies_dir)!r} does not exist; create it or set policies_dir")
    return sorted(
        p
        for p in policies_dir.iterdir()
        if p.is_file() and p.suffix in (".yaml", ".yml") and not p.name.startswith((".", "#"))
    )


def _validation_error(exc: ValidationError, data: Any, file: str) -> PolicyError:
    err = exc.errors()[0]
    loc = list(err["loc"])
    rule_id = None
    fld: str | None = None
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        raw = data.get("rules", [])[loc[1]] if isinstance(data, dict) else None
        rule_id = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") is not None else f"#{loc[1] + 1}"
        rest = loc[2:]
        if rest and rest[0] in (*MATCH_KINDS, "limit", "instructions", "unicode"):
            rest = rest[1:]  # the union's tag, not a field
        if err["type"].startswith("union_tag"):
            rest = ["kind"]
        fld = ".".join(str(p) for p in rest) or None
    else:
        fld = ".".join(str(p) for p in loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field (check the spelling; see docs/policies.md)"
    more = len(exc.errors()) - 1
    if more:
        msg += f" (and {more} more error{'s' if more > 1 else ''} in this file)"
    return PolicyError(msg, file=file, rule_id=rule_id, field=fld)


def load_policy_set(policies_dir: Path) -> PolicySet:
    """Parse, validate and compile every rule file in `policies_dir`; PolicyError on the first problem."""
    paths = _rule_files(policies_dir)
    digest = hashlib.sha256()
    rules: list[Any] = []
    rule_files: dict[str, str] = {}
    for path in paths:
        file = str(path)
        raw = path.read_bytes()
        digest.update(path.name.encode() + b"\0" + raw + b"\0")
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise PolicyError(f"not valid YAML{where}: {getattr(exc, 'problem', exc)}", file=file) from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise PolicyError("a rule file must be a mapping with a `rules:` list", file=file)
        try:
            parsed = RuleFile.model_validate(data)
        except ValidationError as exc:
            raise _validation_error(exc, data, file) from None
        defaults = parsed.defaults
        for rule in parsed.rules:
            update: dict[str, Any] = {}
            if defaults is not None and defaults.mode is not None and "mode" not in rule.model_fields_set:
                update["mode"] = defaults.mode
            if defaults is not None and defaults.refusal is not None and getattr(rule, "refusal", "") is None:
                update["refusal"] = defaults.refusal
            if update:
                rule = rule.model_copy(update=update)
            if rule.id in rule_files:
                raise PolicyError(
                    f"duplicate rule id (also defined in {rule_files[rule.id]})", file=file, rule_id=rule.id, field="id"
                )
            rule_files[rule.id] = file
            rules.append(rule)
    stages = {}
    for stage in ("input", "output"):
        entries: list[tuple[MatchRuleModel, str]] = [
            (r, rule_files[r.id]) for r in rules if r.kind in MATCH_KINDS and stage in r.stages
        ]
        stages[stage] = compile_stage(entries)
    return PolicySet(
        version=digest.hexdigest()[:16],
        rules=rules,
        rule_files=rule_files,
        stages=stages,
        files=[str(p) for p in paths],
    )


# -- helpers --------------------------------------------------------------------------------


def in_scope(rule: Rule, ctx: RequestContext) -> bool:
    scope = rule.scope
    if scope is None:
        return True
    for globs, value in ((scope.api_keys, ctx.api_key), (scope.users, ctx.user), (scope.models, ctx.model)):
        if globs is not None and not any(fnmatchcase(value or "", g) for g in globs):
            return False
    return True


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
    for i, ch in enumerate(text):
        if ch in allow or ch in _KEEP_CONTROLS or (ch.isascii() and ch.isprintable()):
            continue
        if unicodedata.category(ch) in cats:
            out.append(i)
    return out


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
    if rule.max_input_tokens is not None:
        # Without a tokenizer, ~4 characters per token is the usual estimate for English text.
        count = tokenizer_count or (lambda t: (len(t) + 3) // 4)
        tokens = sum(count(t) for t in texts)
        if tokens > rule.max_input_tokens:
            out.append(f"max_input_tokens: {tokens} > {rule.max_input_tokens}")
    return out


# -- the engine -----------------------------------------------------------------------------


class PolicyEngine:
    """Loads and enforces the rule files of one directory; see the module docstring."""

    def __init__(
        self,
        policies_dir: Path,
        *,
        registry: CollectorRegistry | None = None,
        tokenizer_count: Callable[[str], int] | None = None,
    ) -> None:
        self.policies_dir = Path(policies_dir)
        # Without a registry the metrics go to a private one, so several engines can coexist (tests).
        self._metrics = _Metrics.create(registry if registry is not None else CollectorRegistry())
        self._tokenizer_count = tokenizer_count
        self._active: PolicySet | None = None

    # -- loading --

    @property
    def active(self) -> PolicySet:
        if self._active is None:
            raise RuntimeError("PolicyEngine.load() has not been called")
        return self._active

    def load(self) -> PolicySet:
        """Initial load: raises PolicyError on any invalid file (the server should refuse to start)."""
        self._active = load_policy_set(self.policies_dir)
        self._metrics.set_version(self._active.version)
        log.info(
            "policy rule set %s loaded: %d rules from %d files, output hold-back %d chars",
            self._active.version,
            len(self._active.rules),
            len(self._active.files),
            self._active.hold_back,
        )
        return self._active

    def reload(self) -> ReloadResult:
        """Build the set from the files again; on error keep the active one and report why."""
        previous = self._active.version if self._active is not None else None
        try:
            new = load_policy_set(self.policies_dir)
        except PolicyError as exc:
            self._metrics.reloads.labels(result="error").inc()
            log.error("policy reload rejected, keeping rule set %s: %s", previous, exc)
            return ReloadResult(ok=False, version=previous or "", previous_version=previous, error=exc)
        self._active = new
        self._metrics.reloads.labels(result="ok").inc()
        self._metrics.set_version(new.version)
        if new.version != previous:
            log.info("policy rule set %s -> %s (%d rules)", previous, new.version, len(new.rules))
        return ReloadResult(ok=True, version=new.version, previous_version=previous)

    async def watch(self, stop_event: asyncio.Event, *, debounce_ms: int = 300) -> None:
        """Reload whenever a rule file in the directory changes, until `stop_event` is set."""
        import watchfiles

        def yaml_only(_change: watchfiles.Change, path: str) -> bool:
            return path.endswith((".yaml", ".yml"))

        async for _changes in watchfiles.awatch(
            self.policies_dir, watch_filter=yaml_only, stop_event=stop_event, debounce=debounce_ms, recursive=False
        ):
            await asyncio.to_thread(self.reload)

    # -- decisions --

    def _record(self, sink: list[Decision] | None) -> Callable[[Decision], None]:
        """A callback that counts a decision (and appends it to `sink`, if given)."""

        def record(d: Decision) -> None:
            if sink is not None:
                sink.append(d)
            self._metrics.decisions.labels(rule=d.rule_id, action=d.action, mode=d.mode, stage=d.stage).inc()

        return record

    def _active_indices(self, stage: CompiledStage, ctx: RequestContext, role: str | None = None) -> list[int]:
        out = []
        for r in stage.rules:
            rule = r.rule
            if not in_scope(rule, ctx):
                continue
            if role is not None and rule.roles is not None and role not in rule.roles:
                continue
            out.append(r.index)
        return out

    # -- input --

    def check_input(
        self, messages: list[dict[str, Any]], ctx: RequestContext, max_tokens: int | None = None
    ) -> InputResult:
        """Apply limits, unicode, match and instruction rules to a request's messages."""
        ps = self.active
        decisions: list[Decision] = []
        record = self._record(decisions)
        msgs = copy.deepcopy(messages)

        def decide(rule: Any, action: str, **kw: Any) -> Decision:
            d = Decision(
                rule_id=rule.id, kind=rule.kind, action=action, mode=rule.mode, stage="input",
                ruleset_version=ps.version, **kw,
            )  # fmt: skip
            record(d)
            return d

        def blocked(rule: Any) -> InputResult:
            refusal = getattr(rule, "refusal", None) or DEFAULT_REFUSAL
            return InputResult(msgs, True, refusal, max_tokens, decisions, ps.version)

        in_scope_rules = [r for r in ps.rules if in_scope(r, ctx)]

        # 1. Limits, on what the client sent.
        for rule in (r for r in in_scope_rules if isinstance(r, LimitRule)):
            violations = self._limit_violations(rule, msgs)
            for detail in violations:
                decide(rule, rule.action, detail=detail)
            if violations and rule.mode == "enforce" and rule.action == "block":
                return blocked(rule)
            if rule.max_output_tokens is not None and (max_tokens is None or max_tokens > rule.max_output_tokens):
                decide(rule, "limit", detail=f"max_tokens {max_tokens} -> {rule.max_output_tokens}")
                if rule.mode == "enforce":
                    max_tokens = rule.max_output_tokens

        # 2. Invisible and control characters.
        for urule in (r for r in in_scope_rules if isinstance(r, UnicodeRule)):
            for mi, message in enumerate(msgs):
                for key, text in _text_parts(message):
                    bad = bad_chars(text, urule)
                    if not bad:
                        continue
                    shown = ", ".join(sorted({f"U+{ord(text[i]):04X}" for i in bad})[:8])
                    decide(
                        urule, urule.action, message_index=mi, span=(bad[0], bad[-1] + 1), detail=f"{len(bad)}: {shown}"
                    )
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
                active = self._active_indices(stage, ctx, role=str(message.get("role", "")))
                if not active:
                    continue
                for key, text in _text_parts(message):
                    m = Matcher(
                        stage, active, stage_name="input", version=ps.version, on_decision=record, message_index=mi
                    )
                    m.feed(text)
                    m.finish()
                    if m.stopped:
                        return InputResult(msgs, True, m.refusal, max_tokens, decisions, ps.version)
                    if m.final_text != text:
                        _set_text(message, key, m.final_text)

        # 4. Operator instructions: one system message at the front (chat templates want at most one).
        texts = []
        for irule in (r for r in in_scope_rules if isinstance(r, InstructionsRule)):
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

    def _limit_violations(self, rule: LimitRule, msgs: list[dict[str, Any]]) -> list[str]:
        return limit_violations(rule, msgs, self._tokenizer_count)

    # -- output --

    def output_filter(self, ctx: RequestContext) -> OutputFilter:
        """A fresh filter for one choice of one response."""
        ps = self.active
        stage = ps.stages["output"]
        matcher = Matcher(
            stage,
            self._active_indices(stage, ctx),
            stage_name="output",
            version=ps.version,
            on_decision=self._record(None),  # the matcher keeps its own list
        )
        return OutputFilter(matcher)

    def policy_pair(
        self,
        messages: list[dict[str, Any]],
        original_text: str,
        final_text: str,
        decisions: list[Decision],
        *,
        refusal: str | None = None,
    ) -> PolicyPair | None:
        """A preference pair when an enforced output rule blocked or rewrote the response, else None.

        rejected = what the model wrote; chosen = the redacted text, or for a block the refusal
        (the compliant answer to the prompt is to decline, not a truncated answer).
        """
        fired = [
            d for d in decisions
            if d.stage == "output" and d.mode == "enforce" and d.action in ("block", "redact", "rewrite")
        ]  # fmt: skip
        if not fired:
            return None
        block = next((d for d in fired if d.action == "block"), None)
        if block is not None:
            if refusal is None:
                rule = self._active.rule(block.rule_id) if self._active is not None else None
                refusal = getattr(rule, "refusal", None) or DEFAULT_REFUSAL
            chosen = refusal
        else:
            chosen = final_text
        if chosen == original_text:
            return None
        return PolicyPair(
            prompt=[Message(role=m["role"], content=m["content"]) for m in messages],
            rejected=original_text,
            chosen=chosen,
            rule_ids=sorted({d.rule_id for d in fired}),
            ruleset_version=fired[0].ruleset_version,
        )
