"""Chat completions (/v1/chat/completions): shapes the generation pipeline's output as OpenAI's chat objects.

The pipeline (`serve/services/generation.py`) does the work — input policy, pinned
engine request, output policy, record; this module builds the messages it is
given and turns its deltas into one `ChatCompletionResponse` or a stream of
`ChatCompletionChunk`s (framed by `serve/services/sse.py`).

A stream's per-token chunks differ only in the choice index, the text and the finish reason: `ChunkFrames`
encodes the rest once per stream and writes those three into it, the bytes pydantic would write for the
same `ChatCompletionChunk` (tests/serve/test_sse.py compares them). Building and serializing a model per
token was the largest cost of a streamed chunk in the API process (bench/api_cost.py, docs/performance.md).
Chunks with logprobs or running usage, the first and the usage chunk are still models.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

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

_json = msgspec.json.Encoder()
"""Encodes a str exactly as pydantic's serializer does (tests/serve/test_sse.py checks every code point)."""


class ChunkFrames:
    """One stream's `ChatCompletionChunk` event bytes around a delta's index, text and finish reason."""

    def __init__(self, job_id: str, created: int, model: str, version: str) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                _json.encode(job_id),
                b',"object":"chat.completion.chunk","created":',
                str(created).encode(),
                b',"model":',
                _json.encode(model),
                b',"choices":[{"index":',
            )
        )
        self._tail = b'}],"system_fingerprint":' + _json.encode(version) + b"}\n\n"

    def delta(self, index: int, text: str, finish_reason: str | None) -> bytes:
        """The event of a chunk whose one choice has content `text`, no logprobs, and no usage."""
        return b"".join(
            (
                self._head,
                str(index).encode(),
                b',"delta":{"content":',
                _json.encode(text),
                b'},"logprobs":null,"finish_reason":',
                b"null" if finish_reason is None else _json.encode(finish_reason),
                self._tail,
            )
        )


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

    async def open_stream(self, job: Job) -> AsyncGenerator[bytes, None]:
        """Start the job, then return its SSE lines: errors before the first token become HTTP errors."""
        deltas = await self.pipeline.start(job)
        return sse(self._chunks(job, deltas), job.id)

    async def _chunks(
        self, job: Job, deltas: AsyncGenerator[Delta, None]
    ) -> AsyncGenerator[ChatCompletionChunk | bytes, None]:
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
            frames = ChunkFrames(job.id, int(job.started), self.engine.model_name, job.version)
            with_logprobs = job.request.logprobs_count() is not None
            async for d in deltas:
                usage = job.running_usage(d.index)
                if usage is None and not (with_logprobs and d.logprobs):
                    yield frames.delta(d.index, d.text, d.finish_reason)
                    continue
                yield chunk(
                    [
                        StreamChoice(
                            index=d.index,
                            delta=DeltaMessage(content=d.text),
                            logprobs=ChoiceLogprobs(content=d.logprobs) if with_logprobs and d.logprobs else None,
                            finish_reason=d.finish_reason,
                        )
                    ],
                    usage,
                )
            if job.request.include_usage:
                yield chunk([], job.usage())
