"""FastAPI dependencies as `Annotated` aliases, so route signatures read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve.errors import Unavailable
from serve.services.chat import Caller, ChatService
from serve.services.completions import CompletionService
from serve.services.feedback import FeedbackService


def _chat(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


def _completions(request: Request) -> CompletionService:
    return request.app.state.completions  # type: ignore[no-any-return]


def _feedback(request: Request) -> FeedbackService:
    service = getattr(request.app.state, "feedback", None)
    if service is None:
        raise Unavailable("feedback needs completion logging; this server runs with SECONDSTAGE_LOGGING_ENABLED=false")
    return service  # type: ignore[no-any-return]


def _caller(request: Request) -> Caller:
    auth = request.headers.get("authorization", "")
    key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    return Caller(api_key=key or None)


ChatDep = Annotated[ChatService, Depends(_chat)]
CompletionsDep = Annotated[CompletionService, Depends(_completions)]
FeedbackDep = Annotated[FeedbackService, Depends(_feedback)]
CallerDep = Annotated[Caller, Depends(_caller)]
