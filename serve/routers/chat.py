"""POST /v1/chat/completions."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from serve.deps import ChatCallerDep, ChatDep, RequestLimitDep
from serve.errors import ClientClosed
from serve.protocol import ChatCompletionRequest, ChatCompletionResponse
from serve.routers import EventStream, error_responses

router = APIRouter()

ERROR_RESPONSES = error_responses(400, 401, 403, 404, 413, 429)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, chat: ChatDep, caller: ChatCallerDep, limits: RequestLimitDep
) -> Any:
    job = chat.prepare(body, caller)
    await limits.charge_tokens([job])
    if body.stream:
        lines = await chat.open_stream(job)
        return limits.apply(EventStream(lines))
    return await until_disconnect(request, chat.complete(job))


async def until_disconnect(request: Request, coro: Any) -> Any:
    """Run `coro`, cancelling it (and so aborting its engine request) if the client goes away."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ClientClosed("client disconnected")
