"""The policy engine: loads `policies/*.yaml`, checks requests and filters responses, reloads safely.

The chat service builds one `PolicyEngine` at startup, calls `check_input()` before the model
and `output_filter()` per choice after it, stores every `Decision` with the completion record,
and turns blocked or redacted outputs into preference pairs with `policy_pair()`. A reload
parses, validates and compiles the new files completely before swapping them in; on any error
the last good set stays active.

This class is the facade; the work lives in one module per concept: loading.py (rule files →
`PolicySet`, reloads), input.py (the input stage), stream.py (the output stage), scope.py (which
rules apply to a caller), results.py and metrics.py; fanout.py carries a reload to every replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from core.policy import input as input_stage
from core.policy.correction import CorrectionCheck, check_correction
from core.policy.loading import PolicySet, RuleSetLoader
from core.policy.metrics import PolicyMetrics
from core.policy.results import Decision, InputResult, ReloadResult
from core.policy.schema import DEFAULT_REFUSAL
from core.policy.scope import RequestContext, active_indices
from core.policy.stream import Matcher, OutputFilter
from core.records import Message, PolicyPair


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
        self._metrics = PolicyMetrics.create(registry if registry is not None else CollectorRegistry())
        self._tokenizer_count = tokenizer_count
        self._loader = RuleSetLoader(self.policies_dir, self._metrics)
        self.on_reload: Callable[[ReloadResult], Awaitable[None]] | None = None
        """Called after a successful `reload_off_loop(announce=True)`: the fan-out to other replicas (fanout.py)."""

    # -- loading --

    @property
    def _active(self) -> PolicySet | None:
        return self._loader.current

    @property
    def active(self) -> PolicySet:
        if self._active is None:
            raise RuntimeError("PolicyEngine.load() has not been called")
        return self._active

    def load(self) -> PolicySet:
        """Initial load: raises PolicyError on any invalid file (the server should refuse to start)."""
        return self._loader.load()

    def reload(self) -> ReloadResult:
        """Build the set from the files again; on error keep the active one and report why."""
        return self._loader.reload()

    async def reload_off_loop(self, *, wait: bool = True, announce: bool = True) -> ReloadResult:
        """`reload` in a worker thread, one at a time (compiling takes seconds; streams must not stall).

        With wait=False a reload already running raises `ReloadBusy` instead of queueing another.
        A successful reload is announced through `on_reload` (every replica reloads) unless `announce` is False,
        as for reloads that an announcement itself caused.
        """
        result = await self._loader.reload_off_loop(wait=wait)
        if announce and result.ok and self.on_reload is not None:
            await self.on_reload(result)
        return result

    async def watch(self, stop_event: asyncio.Event, *, debounce_ms: int = 300) -> None:
        """Reload whenever a rule file in the directory changes, until `stop_event` is set."""
        await self._loader.watch(stop_event, debounce_ms=debounce_ms)

    # -- decisions --

    def _count(self, d: Decision) -> None:
        self._metrics.decisions.labels(rule=d.rule_id, action=d.action, mode=d.mode, stage=d.stage).inc()

    # -- input --

    def check_input(
        self, messages: list[dict[str, Any]], ctx: RequestContext, max_tokens: int | None = None
    ) -> InputResult:
        """Apply limits, unicode, match and instruction rules to a request's messages."""
        return input_stage.check_input(
            self.active, messages, ctx, max_tokens, on_decision=self._count, tokenizer_count=self._tokenizer_count
        )

    # -- corrections --

    def check_correction(self, text: str) -> CorrectionCheck:
        """A user's correction through every input and output rule before it may train (correction.py)."""
        return check_correction(self.active, text)

    # -- output --

    def output_filter(self, ctx: RequestContext) -> OutputFilter:
        """A fresh filter for one choice of one response."""
        ps = self.active
        stage = ps.stages["output"]
        matcher = Matcher(
            stage,
            active_indices(stage, ctx),
            stage_name="output",
            version=ps.version,
            on_decision=self._count,  # the matcher keeps its own list
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
