"""User feedback on a completion: validated against the completion, then recorded as a `FeedbackRecord`.

Only the identity that made the completion (its API key; anonymous for anonymous ones) or an admin
key may post feedback on it. Anyone else gets the same 404 as for an id that does not exist, not a
403: a 403 would confirm to a stranger that the id is real, and there is nothing they could do with
that answer except probe. When the completion cannot be checked now (Redis down, or an id made moments ago
whose record another replica has not written yet: see serve/services/records.py), feedback is accepted
and recorded with the poster's key, as before; align joins it to the completion later.

A correction becomes the answer align teaches the model, so it goes through the operator's rules first
(`PolicyEngine.check_correction`, core/policy/correction.py): what a rule redacts is stored redacted, never
in clear, and the decisions go on the record (`FeedbackRecord.policy`); a correction an enforced block rule
stops is refused with a 400 naming `correction` and nothing of that feedback is stored (the client can send
it again without that content). align checks corrections again when it builds rows, as rules may change.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from core.records import FeedbackRecord, PolicyDecision, PolicyTrace
from serve.errors import BadRequest, NotFound
from serve.protocol import FeedbackRequest, FeedbackResponse

if TYPE_CHECKING:
    from core.policy import PolicyEngine
    from serve.caller import Caller
    from serve.canary import SignalRecorder
    from serve.metrics import Metrics
    from serve.services.records import Recorder

KINDS = ("thumbs", "rating", "comment", "correction", "preferred_choice")


class FeedbackService:
    def __init__(
        self,
        recorder: Recorder,
        metrics: Metrics,
        policy: PolicyEngine | None = None,
        signals: SignalRecorder | None = None,
    ) -> None:
        self.recorder = recorder
        self.metrics = metrics
        self.policy = policy
        self.signals = signals

    def _screen(self, correction: str | None) -> tuple[str | None, PolicyTrace | None]:
        """The correction as the rules leave it, and what they did; BadRequest when a block rule stops it."""
        if correction is None or self.policy is None:
            return correction, None
        checked = self.policy.check_correction(correction)
        if checked.text is None:
            # The message names the rule, never the matched text: echoing a secret back defeats the rule.
            raise BadRequest(
                f"correction: blocked by policy rule {checked.blocked_by!r}, so it cannot be used as a preferred "
                "answer; nothing of this feedback was recorded. Remove that content and send it again",
                param="correction",
            )
        trace = PolicyTrace(
            ruleset=checked.ruleset_version,
            decisions=[msgspec.convert(d, PolicyDecision, from_attributes=True) for d in checked.decisions],
        )
        return checked.text, trace

    async def submit(self, req: FeedbackRequest, caller: Caller) -> FeedbackResponse:
        ref = await self.recorder.lookup(req.completion_id)
        if ref is None or (ref.checked and ref.key != caller.key_id and not caller.is_admin):
            raise NotFound(f"no completion with id {req.completion_id!r}", param="completion_id")
        n = ref.choices
        if n >= 0:  # -1: cannot be checked now (Redis down); accepted and checked by align later
            for name in ("choice_index", "preferred_choice"):
                value = getattr(req, name)
                if value is not None and value >= n:
                    raise BadRequest(
                        f"{name}: completion {req.completion_id} has {n} choice(s), so {name} must be "
                        f"below {n} (got {value})",
                        param=name,
                    )
        if req.preferred_choice is not None and n == 1:
            raise BadRequest(
                "preferred_choice: needs a completion with n>1 choices; use thumbs or correction instead",
                param="preferred_choice",
            )
        correction, trace = self._screen(req.correction)
        now = time.time()
        feedback_id = f"fb-{uuid.uuid4().hex}"
        self.recorder.feedback(
            FeedbackRecord(
                id=feedback_id,
                completion_id=req.completion_id,
                created=now,
                choice_index=req.choice_index,
                thumbs=req.thumbs,
                rating=req.rating,
                comment=req.comment,
                correction=correction,
                preferred_choice=req.preferred_choice,
                user=req.user,
                key=caller.key_id,
                policy=trace,
            )
        )
        if self.signals is not None:  # a live signal of the version that answered, while it runs as a canary
            self.signals.feedback(ref.version, req.completion_id, req)
        for kind in KINDS:
            if getattr(req, kind) is not None:
                label = f"thumbs_{req.thumbs}" if kind == "thumbs" else kind
                self.metrics.feedback.labels(label, ref.version or "unknown").inc()
        return FeedbackResponse(id=feedback_id, completion_id=req.completion_id, created=int(now))
