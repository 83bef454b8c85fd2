"""Text completions (/v1/completions): each prompt is one engine request run through the chat path.

Prompts reuse `ChatService` for policy, version pinning, generation and records;
this module only numbers the choices across prompts (prompt i, sample j → index
i*n+j), applies `echo`, and shapes OpenAI's legacy completion objects.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve.errors import BadRequest, to_error
from serve.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo
from serve.services.chat import Caller, ChatService, Delta, Job, TokenLogprob


class CompletionService:
    def __init__(self, chat: ChatService) -> None:
        self.chat = chat
        self.engine = chat.engine

    def prepare(self, req: CompletionRequest, caller: Caller) -> list[Job]:
        self.chat.check_model(req.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        vocab = len(self.engine.tokenizer)
        jobs = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, list):
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise BadRequest(f"prompt: token ids must be in [0, {vocab}) (got {bad[:5]})", param="prompt")
                text = self.engine.tokenizer.decode(ids)
                render = _fixed(ids)
            else:
                text = prompt
                render = self._render_text
            job = self.chat.prepare_job(
                req,
                caller,
                [{"role": "user", "content": text}],
                render,
                f"{request_id}-{i}" if i else request_id,
                route="completions",
                param="prompt",
            )
            job.index_offset = i * req.n
            jobs.append(job)
        return jobs

    def _render_text(self, messages: list[dict[str, Any]]) -> list[int]:
        # The input policy may have rewritten the prompt; raw completions take no system messages.
        return list(self.engine.tokenizer.encode(messages[-1]["content"], add_special_tokens=True))

    def _echo(self, job: Job) -> str:
        req = job.request
        return str(self.engine.tokenizer.decode(job.prompt_ids)) if getattr(req, "echo", False) else ""

    async def complete(self, jobs: list[Job]) -> CompletionResponse:
        iterators = [await self.chat.start(job) for job in jobs]

        async def drain(it: AsyncIterator[Delta]) -> None:
            async for _ in it:
                pass

        await asyncio.gather(*(drain(it) for it in iterators))
        choices = []
        for job in jobs:
            prefix = self._echo(job)
            for c in job.choices:
                choices.append(
                    CompletionChoice(
                        index=job.index_offset + c.index,
                        text=prefix + "".join(c.text),
                        logprobs=_legacy(c.logprobs, len(prefix)) if job.request.logprobs_count() is not None else None,
                        finish_reason=c.finish_reason,
                    )
                )
        return CompletionResponse(
            id=jobs[0].id,
            created=int(jobs[0].started),
            model=self.engine.model_name,
            choices=choices,
            usage=_sum_usage([self.chat.usage(j) for j in jobs]),
            system_fingerprint=jobs[0].version,
        )

    async def open_stream(self, jobs: list[Job]) -> AsyncIterator[str]:
        iterators = [await self.chat.start(job) for job in jobs]
        return self._sse(jobs, iterators)

    async def _sse(self, jobs: list[Job], iterators: list[AsyncIterator[Delta]]) -> AsyncIterator[str]:
        first = jobs[0]
        queue: asyncio.Queue[tuple[Job, Delta] | None] = asyncio.Queue()

        async def pump(job: Job, it: AsyncIterator[Delta]) -> None:
            try:
                async for d in it:
                    await queue.put((job, d))
            finally:
                await queue.put(None)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
            body = CompletionResponse(
                id=first.id,
                created=int(first.started),
                model=self.engine.model_name,
                choices=choices,
                usage=usage,
                system_fingerprint=first.version,
            )
            return f"data: {body.model_dump_json(exclude={'usage'} if usage is None else None)}\n\n"

        tasks = [asyncio.create_task(pump(j, it)) for j, it in zip(jobs, iterators, strict=True)]
        try:
            for job in jobs:
                prefix = self._echo(job)
                if prefix:
                    for i in range(job.request.n):
                        yield chunk(
                            [CompletionChoice(index=job.index_offset + i, text=prefix)], self.chat.running_usage(job, i)
                        )
            open_ = len(tasks)
            while open_:
                item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                job, d = item
                logprobs = _legacy(d.logprobs or [], 0) if job.request.logprobs_count() is not None else None
                yield chunk(
                    [
                        CompletionChoice(
                            index=job.index_offset + d.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                        )
                    ],
                    self.chat.running_usage(job, d.index),
                )
            for task in tasks:
                task.result()  # surface a failure of any prompt
            if first.request.include_usage:
                yield chunk([], _sum_usage([self.chat.usage(j) for j in jobs]))
        except Exception as exc:  # the 200 is already sent: the error goes out as the next chunk
            _, body = to_error(exc)
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield "data: [DONE]\n\n"


def _fixed(ids: list[int]) -> Any:
    return lambda _messages: ids


def _sum_usage(usages: list[UsageInfo]) -> UsageInfo:
    p = sum(u.prompt_tokens for u in usages)
    c = sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _legacy(logprobs: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Chat-style per-token logprobs → the legacy completions layout."""
    out = CompletionLogprobs()
    pos = offset
    for t in logprobs:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        # OpenAI's legacy layout (and vLLM's) lists the sampled token first, then the top alternatives.
        out.top_logprobs.append({t.token: t.logprob, **{alt.token: alt.logprob for alt in t.top_logprobs}})
        out.text_offset.append(pos)
        pos += len(t.token)
    return out
