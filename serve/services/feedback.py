"""User feedback on a completion: validated against the completion, then recorded as a `FeedbackRecord`."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from core.records import FeedbackRecord
from serve.errors import BadRequest, NotFound
from serve.protocol import FeedbackRequest, FeedbackResponse

if TYPE_CHECKING:
    from serve.metrics import Metrics
    from serve.services.records import Recorder

KINDS = ("thumbs", "rating", "comment", "correction", "preferred_choice")


class FeedbackService:
    def __init__(self, recorder: Recorder, metrics: Metrics) -> None:
        self.recorder = recorder
        self.metrics = metrics

    async def submit(self, req: FeedbackRequest, user: str | None = None) -> FeedbackResponse:
        n = await self.recorder.choices_of(req.completion_id)
        if n is None:
            raise NotFound(f"no completion with id {req.completion_id!r}", param="completion_id")
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
                correction=req.correction,
                preferred_choice=req.preferred_choice,
                user=req.user if req.user is not None else user,
            )
        )
        for kind in KINDS:
            if getattr(req, kind) is not None:
                label = f"thumbs_{req.thumbs}" if kind == "thumbs" else kind
                self.metrics.feedback.labels(label).inc()
        return FeedbackResponse(id=feedback_id, completion_id=req.completion_id, created=int(now))
