"""The rule-file format: pydantic models for `policies/*.yaml` (reference: docs/policies.md).

A file holds `rules:` (and optional file-wide `defaults:`). Each rule has an `id`, a
`description`, a `kind` with its own fields, the `stages` it applies to, an `action`, a `mode`
(`enforce` or `shadow`), an optional `scope` and `examples`. Models reject unknown fields so a
typo in a rule file is an error, not a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Stage = Literal["input", "output"]
Mode = Literal["enforce", "shadow"]
Action = Literal["block", "redact", "flag", "rewrite", "instruct", "limit", "strip"]
MatchAction = Literal["block", "redact", "flag", "rewrite"]

DEFAULT_REFUSAL = "I can't help with that request."


def refusal_for(rule: Any) -> str:
    """What a blocking rule answers with: its `refusal` (file defaults applied at load), else DEFAULT_REFUSAL."""
    return getattr(rule, "refusal", None) or DEFAULT_REFUSAL


def _stages(*names: Stage) -> list[Stage]:
    return list(names)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Scope(_Strict):
    """Which requests a rule applies to: shell globs (fnmatch) on API key, user and model name.

    A missing field means "any". A request without a user (or key) is matched as the empty string,
    so `users: ["*"]` still applies to it but `users: ["team-*"]` does not.
    """

    api_keys: list[str] | None = Field(None, description="Globs on the request's API key.")
    users: list[str] | None = Field(None, description="Globs on the request's `user` field.")
    models: list[str] | None = Field(None, description="Globs on the requested model name.")


class Example(_Strict):
    """A text the rule must fire on; `result` (optional) is the exact text after the rule applies."""

    text: str
    result: str | None = None


class Examples(_Strict):
    match: list[str | Example] = Field(default_factory=list, description="Texts the rule must fire on.")
    no_match: list[str] = Field(default_factory=list, description="Texts the rule must not fire on.")

    def match_examples(self) -> list[Example]:
        return [e if isinstance(e, Example) else Example(text=e) for e in self.match]


class _RuleBase(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$", description="Unique rule id.")
    description: str = Field(min_length=1, description="What the rule is for, for humans.")
    mode: Mode = Field("enforce", description="`shadow`: record decisions, change nothing.")
    scope: Scope | None = None
    examples: Examples | None = None


class _MatchRule(_RuleBase):
    """Shared fields of the kinds that match text (keywords, regex, preset)."""

    stages: list[Stage] = Field(default_factory=lambda: _stages("output"), min_length=1)
    action: MatchAction
    refusal: str | None = Field(None, description="Text the assistant answers with when this rule blocks.")
    tag: str | None = Field(None, description="Replacement for a redacted match, e.g. `[EMAIL]`.")
    replacement: str | None = Field(None, description="Text that replaces the match for `action: rewrite`.")
    roles: list[str] | None = Field(
        None, description="Input stage: message roles the rule reads (default: every role)."
    )

    @model_validator(mode="after")
    def _action_fields(self) -> _MatchRule:
        if self.action == "rewrite" and self.replacement is None:
            raise ValueError("`action: rewrite` needs `replacement:` (the text that replaces each match)")
        if self.action != "rewrite" and self.replacement is not None:
            raise ValueError(f"`replacement:` only applies to `action: rewrite`, not `action: {self.action}`")
        if self.tag is not None and self.action != "redact":
            raise ValueError(f"`tag:` only applies to `action: redact`, not `action: {self.action}`")
        return self


class KeywordsRule(_MatchRule):
    kind: Literal["keywords"]
    keywords: list[str] = Field(min_length=1, description="Words or phrases to look for.")
    whole_word: bool = Field(True, description="Match only whole words (`pass` does not fire on `password`).")
    case_sensitive: bool = False

    @field_validator("keywords")
    @classmethod
    def _non_blank(cls, v: list[str]) -> list[str]:
        blank = [i for i, k in enumerate(v) if not k.strip()]
        if blank:
            raise ValueError(f"keywords must not be blank (entries {blank})")
        return v


class RegexRule(_MatchRule):
    kind: Literal["regex"]
    pattern: str = Field(min_length=1, description="A regular expression (Python syntax, no lookarounds).")
    case_sensitive: bool = True
    max_len: int | None = Field(
        None, ge=1, le=16_384, description="Cap on open-ended repeats (`+`, `*`, `{n,}`); required if any."
    )


class PresetRule(_MatchRule):
    kind: Literal["preset"]
    preset: str = Field(description="A named built-in pattern; see docs/policies.md for the list.")


class LimitRule(_RuleBase):
    kind: Literal["limit"]
    stages: list[Literal["input"]] = Field(default_factory=lambda: ["input"], min_length=1)  # type: ignore[arg-type]
    action: Literal["block", "flag"] = Field("block", description="What an input over a limit gets.")
    refusal: str | None = None
    max_input_chars: int | None = Field(None, ge=1)
    max_input_tokens: int | None = Field(None, ge=1)
    max_messages: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, ge=1, description="Clamps the request's max_tokens.")

    @model_validator(mode="after")
    def _some_limit(self) -> LimitRule:
        if all(
            v is None for v in (self.max_input_chars, self.max_input_tokens, self.max_messages, self.max_output_tokens)
        ):
            raise ValueError(
                "a limit rule needs at least one of max_input_chars, max_input_tokens, max_messages, max_output_tokens"
            )
        return self


class InstructionsRule(_RuleBase):
    kind: Literal["instructions"]
    stages: list[Literal["input"]] = Field(default_factory=lambda: ["input"], min_length=1)  # type: ignore[arg-type]
    action: Literal["instruct"] = "instruct"
    text: str = Field(min_length=1, description="Behaviour rules for the model, added as a system message.")


class UnicodeRule(_RuleBase):
    kind: Literal["unicode"]
    stages: list[Literal["input"]] = Field(default_factory=lambda: ["input"], min_length=1)  # type: ignore[arg-type]
    action: Literal["strip", "block", "flag"] = "strip"
    refusal: str | None = None
    categories: list[Literal["Cf", "Cc", "Co", "Cs", "Cn"]] = Field(
        default_factory=lambda: ["Cf", "Cc"],  # type: ignore[arg-type]
        description="Unicode categories to catch (Cc never includes tab, newline, carriage return).",
    )
    allow: list[str] = Field(
        default_factory=list, description='Characters to keep anyway, e.g. U+200D (emoji joiner) as `"\\u200d"`.'
    )


Rule = Annotated[
    KeywordsRule | RegexRule | PresetRule | LimitRule | InstructionsRule | UnicodeRule,
    Field(discriminator="kind"),
]
MATCH_KINDS = ("keywords", "regex", "preset")


class FileDefaults(_Strict):
    mode: Mode | None = Field(None, description="Mode for rules in this file that don't set one.")
    refusal: str | None = Field(None, description="Refusal text for rules in this file that don't set one.")


class RuleFile(_Strict):
    version: Literal[1] = Field(1, description="Format version of the rule file.")
    defaults: FileDefaults | None = None
    rules: list[Rule] = Field(default_factory=list)
