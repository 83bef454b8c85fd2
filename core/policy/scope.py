"""Who is asking, and which rules apply to them: a rule's `scope` globs and, on input, its `roles`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from fnmatch import fnmatchcase

from core.policy.compiler import CompiledStage
from core.policy.schema import Rule


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: what scope globs are matched against, all from the authenticated key.

    Never from the request body: a client could otherwise pick the rules that apply to it.
    """

    api_key: str | None
    """The key's public id (`Caller.key_id`, 16 hex digits); None for an anonymous caller."""
    user: str | None
    """The key's name, set by the operator with `secondstage keys create --name`; None when anonymous."""
    model: str


def in_scope(rule: Rule, ctx: RequestContext) -> bool:
    scope = rule.scope
    if scope is None:
        return True
    for globs, value in ((scope.api_keys, ctx.api_key), (scope.users, ctx.user), (scope.models, ctx.model)):
        if globs is not None and not any(fnmatchcase(value or "", g) for g in globs):
            return False
    return True


def active_indices(stage: CompiledStage, ctx: RequestContext, role: str | None = None) -> Collection[int]:
    """The indices of the stage's rules that apply to this caller (and, if given, to a message of this role)."""
    if stage.unscoped:
        return stage.all_indices  # no per-request pass over the rules: 1,000 rules cost what 10 do
    out = []
    for r in stage.rules:
        rule = r.rule
        if not in_scope(rule, ctx):
            continue
        if role is not None and rule.roles is not None and role not in rule.roles:
            continue
        out.append(r.index)
    return out
