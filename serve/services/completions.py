"""Text completions (/v1/completions): each prompt is one request of the generation pipeline.

The pipeline (`serve/services/generation.py`) does policy, version pinning,
generation and records; this module numbers the choices across prompts (prompt i,
sample j → index i*n+j), applies `echo`, and shapes OpenAI's legacy completion
objects, streamed through the shared SSE framing (`serve/services/sse.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

from serve.caller import Caller
from serve.errors import BadRequest
from serve.protocol import CompletionChoice, CompletionRequest, CompletionResponse, UsageInfo
from serve.services.generation import Delta, Job, Pipeline, Prompt, check_model
from serve.services.logprobs import legacy
from serve.services.records import new_completion_id
from serve.services.sse import sse


class CompletionService:
    def __init__(self, pipeline: Pipeline, *, max_choices: int = 256) -> None:
        self.pipeline = pipeline
        self.engine = pipeline.engine
        self.max_choices = max_choices
        """Most prompts × n in one request (SECONDSTAGE_MAX_COMPLETION_CHOICES)."""

    def prepare(self, req: CompletionRequest, caller: Caller) -> list[Job]:
        check_model(self.engine, req.model)
        prompts = req.prompts()
        # Checked before any per-prompt work: tens of thousands of prompts would keep the event loop busy.
        if len(prompts) * req.n > self.max_choices:
            raise BadRequest(
                f"prompt: {len(prompts)} prompts × n={req.n} is {len(prompts) * req.n} choices, more than this "
                f"server's limit of {self.max_choices} (SECONDSTAGE_MAX_COMPLETION_CHOICES); send fewer prompts "
                "per request or a smaller n",
                param="prompt",
            )
        request_id = new_completion_id("cmpl")
        vocab = len(self.engine.tokenizer)
        jobs = []
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                ids = list(prompt)
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise BadRequest(f"prompt: token ids must be in [0, {vocab}) (got {bad[:5]})", param="prompt")
                what = Prompt.tokens(ids, self.engine.tokenizer.decode(ids))
            else:
                what = Prompt.text(prompt)
            job = self.pipeline.prepare(
                req,
                caller,
                what,
                f"{request_id}-{i}" if i else request_id,
                route="completions",
                param="prompt",
            )
            job.index_offset = i * req.n
            jobs.append(job)
        return jobs

    def _echo(self, job: Job) -> str:
        req = job.request
        return str(self.engine.tokenizer.decode(job.prompt_ids)) if getattr(req, "echo", False) else ""

    async def complete(self, jobs: list[Job]) -> CompletionResponse:
        iterators = [await self.pipeline.start(job) for job in jobs]

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
                        logprobs=legacy(c.logprobs, len(prefix)) if job.request.logprobs_count() is not None else None,
                        finish_reason=c.finish_reason,
                    )
                )
        return CompletionResponse(
            id=jobs[0].id,
            created=int(jobs[0].started),
            model=self.engine.model_name,
            choices=choices,
            usage=_sum_usage([j.usage() for j in jobs]),
            system_fingerprint=jobs[0].version,
        )

    async def open_stream(self, jobs: list[Job]) -> AsyncGenerator[bytes, None]:
        iterators = [await self.pipeline.start(job) for job in jobs]
        return sse(self._chunks(jobs, iterators), jobs[0].id)

    async def _chunks(
        self, jobs: list[Job], iterators: list[AsyncGenerator[Delta, None]]
    ) -> AsyncGenerator[CompletionResponse, None]:
        first = jobs[0]
        queue: asyncio.Queue[tuple[Job, Delta] | None] = asyncio.Queue()

        async def pump(job: Job, it: AsyncIterator[Delta]) -> None:
            try:
                async for d in it:
                    await queue.put((job, d))
            finally:
                await queue.put(None)

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(
                id=first.id,
                created=int(first.started),
                model=self.engine.model_name,
                choices=choices,
                usage=usage,
                system_fingerprint=first.version,
            )

        # Prompts generate concurrently; their deltas go out in the order they arrive.
        tasks = [asyncio.create_task(pump(j, it)) for j, it in zip(jobs, iterators, strict=True)]
        try:
            for job in jobs:
                prefix = self._echo(job)
                if prefix:
                    for i in range(job.request.n):
                        yield chunk([CompletionChoice(index=job.index_offset + i, text=prefix)], job.running_usage(i))
            open_ = len(tasks)
            while open_:
                item = await queue.get()
                if item is None:
                    open_ -= 1
                    continue
                job, d = item
                logprobs = legacy(d.logprobs or [], 0) if job.request.logprobs_count() is not None else None
                yield chunk(
                    [
                        CompletionChoice(
                            index=job.index_offset + d.index,
                            text=d.text,
                            logprobs=logprobs,
                            finish_reason=d.finish_reason,
                        )
                    ],
                    job.running_usage(d.index),
                )
            for task in tasks:
                task.result()  # surface a failure of any prompt
            if first.request.include_usage:
                yield chunk([], _sum_usage([j.usage() for j in jobs]))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _sum_usage(usages: list[UsageInfo]) -> UsageInfo:
    p = sum(u.prompt_tokens for u in usages)
    c = sum(u.completion_tokens for u in usages)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)
