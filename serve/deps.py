"""FastAPI dependencies as `Annotated` aliases, so route signatures read like prose.

Routers take what they need from here instead of reaching into `app.state`;
everything here is built once in the app factory's lifespan.

The accessors are `async def` on purpose: FastAPI runs a plain `def` dependency in its thread pool, a
thread hop per dependency per request — py-spy put 26-43% of the API process' samples in those worker
threads under load (bench/serving.py, docs/performance.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Response

from core.policy import PolicyEngine
from core.redis_supervisor import RedisSupervisor
from serve.auth.authenticator import Authenticator, require
from serve.caller import Caller
from serve.engine import ModelEngine
from serve.errors import NotFound, Unavailable
from serve.limits import Admission, RateLimiter
from serve.metrics import Metrics
from serve.services.chat import ChatService
from serve.services.completions import CompletionService
from serve.services.feedback import FeedbackService
from serve.settings import ServeSettings


async def _chat(request: Request) -> ChatService:
    return request.app.state.chat  # type: ignore[no-any-return]


async def _completions(request: Request) -> CompletionService:
    return request.app.state.completions  # type: ignore[no-any-return]


async def _feedback(request: Request) -> FeedbackService:
    service = getattr(request.app.state, "feedback", None)
    if service is None:
        raise Unavailable("feedback needs completion logging; this server runs with SECONDSTAGE_LOGGING_ENABLED=false")
    return service  # type: ignore[no-any-return]


async def _engine(request: Request) -> ModelEngine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def _policy(request: Request) -> PolicyEngine:
    engine = getattr(request.app.state, "policy", None)
    if engine is None:
        raise NotFound("policies are disabled on this server (SECONDSTAGE_POLICIES_ENABLED=false)")
    return engine  # type: ignore[no-any-return]


async def _settings(request: Request) -> ServeSettings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


async def _started(request: Request) -> float:
    return request.app.state.started  # type: ignore[no-any-return]


async def _redis_supervisor(request: Request) -> RedisSupervisor | None:
    return getattr(request.app.state, "redis_supervisor", None)


async def _caller(request: Request) -> Caller:
    """The one place a request's key is checked: every route's caller (and scope check) comes from here."""
    auth: Authenticator = request.app.state.auth
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else None
    return await auth.caller(key or None)


class _Scoped:
    """The caller, refused (401/403) unless it holds `scope`."""

    def __init__(self, scope: str) -> None:
        self.scope = scope

    async def __call__(self, caller: Annotated[Caller, Depends(_caller)]) -> Caller:
        require(caller, self.scope)
        return caller


async def _admit(request: Request, response: Response, caller: Caller, kind: str) -> Admission:
    limiter: RateLimiter = request.app.state.limiter
    admission = await limiter.admit(caller, kind=kind)
    # A route returning a model gets the headers through `response`; a stream applies them itself.
    admission.response = response
    response.headers.update(admission.headers)
    return admission


_chat_caller = _Scoped("chat")
_feedback_caller = _Scoped("feedback")


async def _request_limits(
    request: Request, response: Response, caller: Annotated[Caller, Depends(_chat_caller)]
) -> AsyncIterator[Admission]:
    admission = await _admit(request, response, caller, "requests")
    try:
        yield admission
    finally:
        # FastAPI runs this after the response has been sent: for a stream, once it ended or its client left.
        await admission.release()


async def _feedback_limits(
    request: Request, response: Response, caller: Annotated[Caller, Depends(_feedback_caller)]
) -> Admission:
    return await _admit(request, response, caller, "feedback")


ChatDep = Annotated[ChatService, Depends(_chat)]
CompletionsDep = Annotated[CompletionService, Depends(_completions)]
FeedbackDep = Annotated[FeedbackService, Depends(_feedback)]
EngineDep = Annotated[ModelEngine, Depends(_engine)]
PolicyDep = Annotated[PolicyEngine, Depends(_policy)]
"""The rule policies; a 404 naming the setting when they are disabled."""
SettingsDep = Annotated[ServeSettings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
StartedDep = Annotated[float, Depends(_started)]
"""When this server started (epoch seconds)."""
CallerDep = Annotated[Caller, Depends(_caller)]
"""Who is asking, with no scope required (401 for a bad key)."""
ChatCallerDep = Annotated[Caller, Depends(_chat_caller)]
"""The caller of a chat route (chat, completions, models, tokenize): needs the `chat` scope."""
FeedbackCallerDep = Annotated[Caller, Depends(_feedback_caller)]
"""The caller of POST /v1/feedback: needs the `feedback` scope."""
CHAT_SCOPE = Depends(_chat_caller)
"""For routes that need the scope but not the caller: `dependencies=[CHAT_SCOPE]`."""
ADMIN_SCOPE = Depends(_Scoped("admin"))
"""For /admin/* routers: `APIRouter(dependencies=[ADMIN_SCOPE])`."""
RedisSupervisorDep = Annotated[RedisSupervisor | None, Depends(_redis_supervisor)]
"""The supervisor of serve's private redis-server; None when Redis is external (SECONDSTAGE_REDIS_URL)."""
RequestLimitDep = Annotated[Admission, Depends(_request_limits)]
"""The caller's requests/min and concurrency, checked (429 when over); tokens/min is charged by the route."""
FeedbackLimitDep = Annotated[Admission, Depends(_feedback_limits)]
"""The caller's feedback/min, checked (429 when over)."""
