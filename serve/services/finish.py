"""The end of a request: metrics, the completion record, and the policy preference pairs.

Called once per request by the generation pipeline when its deltas end (finished,
aborted by a disconnect, or failed) and after a refusal. The record is handed to
the log writer, never awaited on the request path.

What output rules caught never reaches storage in clear unless the operator asks for it
(`store_raw_output`, see docs/security.md): without it a choice has no `raw_text`, and a policy
pair's `rejected` side (the model's own text) has each span an enforced block/redact/rewrite rule
matched replaced by `WITHHELD`. The marker differs from the redaction tag on purpose: the pair
still prefers the enforced text (the tag, or the refusal) to the model's answer, and a reader can
tell which side is which.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, cast

import msgspec

from core.records import (
    ChoiceRecord,
    CompletionRecord,
    Endpoint,
    FinishReason,
    Message,
    PolicyDecision,
    PolicyTrace,
    Status,
    Usage,
)
from serve.metrics import ROUTE_LABELS

if TYPE_CHECKING:
    from collections.abc import Iterable

    from serve.engine import ModelEngine
    from serve.metrics import Metrics
    from serve.services.generation import Job
    from serve.services.records import Recorder


WITHHELD = "[withheld]"
"""Stands for text an output rule caught, in a stored policy pair's `rejected` side."""


def withhold(text: str, decisions: Iterable[Any]) -> str:
    """`text` with every span an enforced block, redact or rewrite decision matched replaced by `WITHHELD`."""
    spans = sorted(
        d.span for d in decisions
        if d.span is not None and d.mode == "enforce" and d.action in ("block", "redact", "rewrite")
    )  # fmt: skip
    out, done = [], 0
    for start, end in spans:
        if end <= done:
            continue  # inside a span already withheld
        if start >= done:
            out.append(text[done:start])
            out.append(WITHHELD)
        done = end
    out.append(text[done:])
    return "".join(out)


def finish_job(
    job: Job, *, engine: ModelEngine, recorder: Recorder | None, metrics: Metrics, policy: Any | None
) -> None:
    # Durations on the monotonic clock (a wall-clock step must not make a latency negative or huge);
    # `created` stays the wall-clock time the request arrived.
    latency = time.perf_counter() - job.clock
    ttft = None if job.first_token_at is None else job.first_token_at - job.clock
    usage = job.usage()
    route = ROUTE_LABELS.get(job.route, job.route)
    metrics.observe_request(
        engine.model_name, route, job.request.stream, job.version, latency, ttft, usage.prompt_tokens,
        usage.completion_tokens,
    )  # fmt: skip
    if recorder is None:
        return
    decisions = [msgspec.convert(d, PolicyDecision, from_attributes=True) for d in job.input_decisions]
    for choice in job.choices:
        if choice.filter is not None:
            decisions.extend(
                msgspec.structs.replace(msgspec.convert(d, PolicyDecision, from_attributes=True), choice=choice.index)
                for d in choice.filter.decisions
            )
    req = job.request
    # Job and Choice hold status, route and finish reason as plain strings; the record's Literal types
    # name the values they may take, and every reader validates them (tests/core/test_records_contract.py).
    record = CompletionRecord(
        id=job.id,
        created=job.started,
        model=engine.model_name,
        version=job.version,
        status=cast("Status", job.status),
        messages=[Message(role=m["role"], content=m["content"]) for m in job.messages],
        endpoint=cast("Endpoint", job.route),
        params=req.model_dump(exclude={"messages", "prompt", "user", "metadata"}, exclude_none=True),
        choices=[
            ChoiceRecord(
                index=c.index,
                text="".join(c.text),
                raw_text="".join(c.raw)
                if recorder.store_raw_output and c.filter is not None and c.raw != c.text
                else None,
                finish_reason=cast("FinishReason | None", c.finish_reason),
                completion_tokens=c.tokens,
            )
            for c in job.choices
        ],
        usage=Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        ),
        latency_s=latency,
        ttft_s=ttft,
        user=req.user,
        key=job.caller.key_id,
        metadata=getattr(req, "metadata", None),
        policy=PolicyTrace(ruleset=job.ruleset, decisions=decisions),
    )
    recorder.completion(record)
    if policy is not None:
        for choice in job.choices:
            if choice.filter is None:
                continue
            original = choice.filter.original_text
            if not recorder.store_raw_output:
                original = withhold(original, choice.filter.decisions)
            pair = policy.policy_pair(
                job.messages,
                original,
                choice.filter.final_text,
                choice.filter.decisions,
                refusal=choice.filter.refusal,
            )
            if pair is not None:
                recorder.policy_pair(f"pp-{job.id}-{choice.index}", job.id, pair)
