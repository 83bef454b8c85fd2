"""What the policy engine hands back: one `Decision` per rule firing, and the results of a check or a reload.

Every decision is stored with the completion record and counted in the metrics (metrics.py); the
chat service acts on `InputResult`, the admin route and the watcher on `ReloadResult`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from core.policy.errors import PolicyError


@dataclass
class Decision:
    """One rule firing on one request: what the audit log and the metrics record."""

    rule_id: str
    kind: str
    action: str
    mode: str
    stage: str
    ruleset_version: str
    span: tuple[int, int] | None = None  # character offsets in the stage's text (a message, or the output)
    message_index: int | None = None  # input stage: which message the span is in
    detail: str | None = None

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["span"] = list(self.span) if self.span is not None else None
        return d


@dataclass
class InputResult:
    messages: list[dict[str, Any]]
    blocked: bool
    refusal: str | None
    max_tokens: int | None
    decisions: list[Decision]
    ruleset_version: str


@dataclass
class ReloadResult:
    ok: bool
    version: str  # the version active after the attempt
    previous_version: str | None
    error: PolicyError | None = None

    @property
    def changed(self) -> bool:
        return self.ok and self.version != self.previous_version
