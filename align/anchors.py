"""The anchor set: logged answers users accepted, which a new version must keep finding likely (bounded drift).

Sampled from the newest completion records in Redis (`<p>:completions`, typed `CompletionRecord`s): chat
requests that finished (`status ok`, first choice `finish_reason stop`) with a non-empty answer that no output
policy touched, and whose completion got positive feedback or none that was negative (no thumbs down, rating
≤ 2, correction, or preference for another choice, in the newest feedback entries). Positive ones come first,
then those without feedback; answers of the parent version before those of older ones; newest first; one per
distinct prompt. Completions this run trains or evaluates on are left out (the anchors must be data the adapter
never saw).

Both scans are bounded (`gate_anchor_scan` stream entries each, newest first) so a long log costs the gate the
same as a short one. The messages are stored as the engine saw them — after the input policies — so the gate
scores exactly what the parent answered. An empty log (a fresh deployment) gives no anchors; the gate then uses
the parent's greedy answers to the regression prompts instead (align/gate.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from core.keys import Keys
from core.records import CompletionRecord, FeedbackRecord, RecordError, decode

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Anchor:
    completion_id: str
    prompt: Messages
    answer: str
    version: str
    liked: bool
    """True when the completion got positive feedback (thumbs up, rating ≥ 4)."""


def _newest_data(client: redis.Redis, stream: str, count: int) -> list[bytes]:
    """The `data` field of the newest `count` entries of `stream`, newest first."""
    entries: Any = client.xrevrange(stream, count=count)
    out = []
    for _, fields in entries or []:
        data = (fields or {}).get(b"data", (fields or {}).get("data"))
        if data is not None:
            out.append(data if isinstance(data, bytes) else str(data).encode())
    return out


def _judgements(client: redis.Redis, keys: Keys, scan: int) -> tuple[set[str], set[str]]:
    """(liked, disliked) completion ids among the newest `scan` feedback entries."""
    liked: set[str] = set()
    disliked: set[str] = set()
    for data in _newest_data(client, keys.feedback, scan):
        try:
            fb = decode(data, FeedbackRecord)
        except RecordError:
            continue
        negative = (
            fb.thumbs == "down"
            or (fb.rating is not None and fb.rating <= 2)
            or bool(fb.correction and fb.correction.strip())
            or (fb.preferred_choice is not None and fb.preferred_choice != fb.choice_index)
        )
        if negative:
            disliked.add(fb.completion_id)
        elif fb.thumbs == "up" or (fb.rating is not None and fb.rating >= 4):
            liked.add(fb.completion_id)
    return liked - disliked, disliked


def sample_anchors(
    client: redis.Redis, keys: Keys, *, parent: str, count: int, scan: int, exclude: Iterable[str] = ()
) -> list[Anchor]:
    """Up to `count` anchors (see the module docstring), best first."""
    if count <= 0:
        return []
    liked, disliked = _judgements(client, keys, scan)
    skip = set(exclude) | disliked
    found: list[Anchor] = []
    seen_prompts: set[str] = set()
    for data in _newest_data(client, keys.completions, scan):
        try:
            rec = decode(data, CompletionRecord)
        except RecordError:
            continue
        choice = rec.choice(0)
        if (
            rec.id in skip
            or rec.status != "ok"
            or rec.endpoint != "chat"
            or choice is None
            or choice.finish_reason != "stop"
            or not choice.text.strip()
            or any(d.stage == "output" for d in rec.policy.decisions)
        ):
            continue
        prompt = [{"role": m.role, "content": m.content} for m in rec.messages]
        key = repr(prompt)
        if key in seen_prompts:
            continue
        seen_prompts.add(key)
        found.append(Anchor(rec.id, prompt, choice.text, rec.version, rec.id in liked))
    # Stable sort: liked first, then the parent's own answers; newest first within each group.
    found.sort(key=lambda a: (not a.liked, a.version != parent))
    return found[:count]
