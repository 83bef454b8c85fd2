"""POST /v1/feedback: thumbs, rating, comment, correction or preferred choice on a completion."""

from __future__ import annotations

from fastapi import APIRouter

from serve.deps import FeedbackCallerDep, FeedbackDep, FeedbackLimitDep
from serve.protocol import FeedbackRequest, FeedbackResponse
from serve.routers import error_responses

router = APIRouter()


@router.post(
    "/v1/feedback", response_model=FeedbackResponse, responses=error_responses(400, 401, 403, 404, 413, 429, 503)
)
async def create_feedback(
    body: FeedbackRequest, feedback: FeedbackDep, caller: FeedbackCallerDep, _: FeedbackLimitDep
) -> FeedbackResponse:
    return await feedback.submit(body, caller)
