"""The operator's regression set: prompts the served model must keep answering well, whatever users teach it.

A YAML file (`SECONDSTAGE_REGRESSION_FILE`, default `evals/regression.yaml`) owned by the operator, like the
policy files. Each case is a prompt (or a message list) and checks on the model's greedy answer:

    version: 1
    cases:
      - id: sky-why                       # unique; named in the gate report
        prompt: Why is the sky blue?      # or `messages: [{role: user, content: ...}, ...]`
        must_contain: [blue]              # every one, case-insensitive unless case_sensitive: true
        must_not_contain: [matey]         # none of them
        reference: Air scatters blue light more than red light, so the sky looks blue.
        min_similarity: 0.6               # difflib ratio to the reference (lower-cased, spaces collapsed)
        max_chars: 200                    # the answer stays this short (catches rambling and loops)

Each listed item is one check. The gate (align/gate.py) answers every case with the parent and with the new
adapter, and refuses the new one when it fails a check the parent passed: a check the parent already fails is
reported, not required, so a set written for one machine does not block on another whose base model answers a
little differently (the demo model's greedy answers can differ between CPUs).

The file is validated with pydantic when the run starts, before any training: an error names the file, the line
and the field. The prompts go through the operator's input policies before the model sees them, as in serve.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RegressionFileError(Exception):
    """The regression file cannot be read or is invalid; the message names the file, the line and the field."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class Case(BaseModel):
    """One prompt and the checks its answer must keep passing."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=80, description="Unique name, used in the gate report.")
    prompt: str | None = Field(default=None, min_length=1, description="A single user message.")
    messages: list[Message] | None = Field(default=None, min_length=1, description="A conversation, instead of prompt.")
    must_contain: list[str] = Field(default_factory=list, description="Strings the answer must contain, each.")
    must_not_contain: list[str] = Field(default_factory=list, description="Strings the answer must not contain.")
    case_sensitive: bool = Field(default=False, description="Compare must_(not_)contain with case.")
    reference: str | None = Field(default=None, min_length=1, description="A reference answer.")
    min_similarity: float = Field(
        default=0.6, ge=0.0, le=1.0, description="Least difflib similarity ratio to `reference` (0..1)."
    )
    max_chars: int | None = Field(default=None, ge=1, description="Longest answer allowed, in characters.")

    @model_validator(mode="after")
    def _one_input_and_a_check(self) -> Case:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if not (self.must_contain or self.must_not_contain or self.reference or self.max_chars):
            raise ValueError("a case needs at least one check: must_contain, must_not_contain, reference, max_chars")
        if any(not s for s in [*self.must_contain, *self.must_not_contain]):
            raise ValueError("must_contain / must_not_contain items must be non-empty strings")
        return self

    def chat(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def checks(self) -> list[Check]:
        out = [Check(self.id, "must_contain", s) for s in self.must_contain]
        out += [Check(self.id, "must_not_contain", s) for s in self.must_not_contain]
        if self.reference is not None:
            out.append(Check(self.id, "reference", self.reference))
        if self.max_chars is not None:
            out.append(Check(self.id, "max_chars", str(self.max_chars)))
        return out

    def passes(self, check: Check, answer: str) -> bool:
        if check.kind in ("must_contain", "must_not_contain"):
            hay, needle = (answer, check.arg) if self.case_sensitive else (answer.lower(), check.arg.lower())
            return (needle in hay) == (check.kind == "must_contain")
        if check.kind == "reference":
            return similarity(answer, check.arg) >= self.min_similarity
        return len(answer) <= int(check.arg)


class RegressionSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = 1
    cases: list[Case] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> RegressionSet:
        seen: set[str] = set()
        for case in self.cases:
            if case.id in seen:
                raise ValueError(f"case id {case.id!r} is used twice; ids must be unique")
            seen.add(case.id)
        return self


@dataclass(frozen=True)
class Check:
    case: str
    kind: Literal["must_contain", "must_not_contain", "reference", "max_chars"]
    arg: str

    def describe(self) -> str:
        arg = self.arg if len(self.arg) <= 40 else self.arg[:37] + "..."
        return f"{self.case}: {self.kind} {arg!r}"


def similarity(a: str, b: str) -> float:
    """difflib's ratio of the two texts, lower-cased with whitespace collapsed (stdlib: no fuzzy-match library
    is needed for a handful of short answers)."""

    def norm(s: str) -> str:
        return re.sub(r"\s+", " ", s.strip().lower())

    return difflib.SequenceMatcher(None, norm(a), norm(b)).ratio()


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the YAML node at pydantic's error location `loc`, or of its nearest parent."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def parse(text: str, source: str) -> RegressionSet:
    """Validate `text` as a regression set; `source` (the file) is named in every error."""
    try:
        raw: Any = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise RegressionFileError(f"{source}{where}: not valid YAML: {exc}") from exc
    try:
        return RegressionSet.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            line = _line_of(root, loc)
            field = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{source} line {line}, field {field}: {err['msg']}")
        raise RegressionFileError("; ".join(problems)) from exc


def load(path: Path) -> RegressionSet:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RegressionFileError(
            f"cannot read the regression file {path}: {exc}; fix SECONDSTAGE_REGRESSION_FILE or create the file"
        ) from exc
    return parse(text, str(path))
