"""POST /v1/completions (legacy text completions)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve.deps import ChatCallerDep, CompletionsDep, RequestLimitDep
from serve.protocol import CompletionRequest, CompletionResponse
from serve.routers import EventStream
from serve.routers.chat import ERROR_RESPONSES, until_disconnect

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    completions: CompletionsDep,
    caller: ChatCallerDep,
    limits: RequestLimitDep,
) -> Any:
    jobs = completions.prepare(body, caller)
    await limits.charge_tokens(jobs)
    if body.stream:
        lines = await completions.open_stream(jobs)
        return limits.apply(EventStream(lines))
    return await until_disconnect(request, completions.complete(jobs))
