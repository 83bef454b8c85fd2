"""Chat completions (/v1/chat/completions): shapes the generation pipeline's output as OpenAI's chat objects.

The pipeline (`serve/services/generation.py`) does the work — input policy, pinned
engine request, output policy, record; this module builds the messages it is
given and turns its deltas into one `ChatCompletionResponse` or a stream of
`ChatCompletionChunk`s (framed by `serve/services/sse.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

from serve.caller import Caller
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    StreamChoice,
    UsageInfo,
)
from serve.services.generation import Delta, Job, Pipeline, Prompt, check_model
from serve.services.records import new_completion_id
from serve.services.sse import sse


class ChatService:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.engine = pipeline.engine

    def prepare(self, req: ChatCompletionRequest, caller: Caller) -> Job:
        check_model(self.engine, req.model)
        messages: list[dict[str, Any]] = [{"role": m.role, "content": m.text()} for m in req.messages]
        return self.pipeline.prepare(req, caller, Prompt.chat(messages), new_completion_id("chatcmpl"))

    async def complete(self, job: Job) -> ChatCompletionResponse:
        async for _ in await self.pipeline.start(job):
            pass
        return ChatCompletionResponse(
            id=job.id,
            created=int(job.started),
            model=self.engine.model_name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=AssistantMessage(content="".join(c.text)),
                    logprobs=ChoiceLogprobs(content=c.logprobs) if job.request.logprobs_count() is not None else None,
                    finish_reason=c.finish_reason,
                )
                for c in job.choices
            ],
            usage=job.usage(),
            system_fingerprint=job.version,
        )

    async def open_stream(self, job: Job) -> AsyncGenerator[str, None]:
        """Start the job, then return its SSE lines: errors before the first token become HTTP errors."""
        deltas = await self.pipeline.start(job)
        return sse(self._chunks(job, deltas), job.id)

    async def _chunks(self, job: Job, deltas: AsyncGenerator[Delta, None]) -> AsyncGenerator[ChatCompletionChunk, None]:
        def chunk(choices: list[StreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=job.id,
                created=int(job.started),
                model=self.engine.model_name,
                choices=choices,
                usage=usage,
                system_fingerprint=job.version,
            )

        async with contextlib.aclosing(deltas):
            for i in range(job.request.n):
                yield chunk(
                    [StreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))], job.running_usage(i)
                )
            async for d in deltas:
                yield chunk(
                    [
                        StreamChoice(
                            index=d.index,
                            delta=DeltaMessage(content=d.text),
                            logprobs=ChoiceLogprobs(content=d.logprobs)
                            if job.request.logprobs_count() is not None and d.logprobs
                            else None,
                            finish_reason=d.finish_reason,
                        )
                    ],
                    job.running_usage(d.index),
                )
            if job.request.include_usage:
                yield chunk([], job.usage())
