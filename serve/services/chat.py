"""Chat completions: input policy → engine (pinned to one model version) → output policy → record.

One code path produces both the JSON response and the SSE stream, so the two give
the same text for the same tokens. The engine request is started (and its
validation errors surface as 400s) before any byte of a stream is sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import msgspec

from core.records import (
    ChoiceRecord,
    CompletionRecord,
    Endpoint,
    FinishReason,
    Message,
    PolicyDecision,
    PolicyTrace,
    Status,
    Usage,
)
from serve.errors import BadRequest, NotFound, to_error
from serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    SamplingRequest,
    StreamChoice,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)

if TYPE_CHECKING:
    from serve.engine import ModelEngine, ServedVersion
    from serve.metrics import Metrics
    from serve.services.records import Recorder

logger = logging.getLogger("secondstage.chat")

CONTENT_FILTER = "content_filter"


@dataclass
class Caller:
    """Who is asking: the API key (hashed before it is stored) and the `user` field."""

    api_key: str | None = None
    user: str | None = None

    @property
    def key_id(self) -> str | None:
        return hashlib.sha256(self.api_key.encode()).hexdigest()[:16] if self.api_key else None


@dataclass
class Choice:
    index: int
    filter: Any | None
    top_n: int = 0
    text: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Delta:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Job:
    """One prepared request: everything decided before the engine (or the refusal) runs."""

    id: str
    request: SamplingRequest
    caller: Caller
    messages: list[dict[str, Any]]
    prompt_ids: list[int]
    params: Any
    version: str
    started: float
    refusal: str | None = None
    input_decisions: list[Any] = field(default_factory=list)
    ruleset: str | None = None
    policy_ctx: Any = None
    choices: list[Choice] = field(default_factory=list)
    first_token_at: float | None = None
    status: str = "ok"
    route: str = "chat"
    index_offset: int = 0  # /v1/completions numbers choices across prompts


class ChatService:
    def __init__(
        self,
        engine: ModelEngine,
        recorder: Recorder | None,
        metrics: Metrics,
        policy: Any | None = None,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.metrics = metrics
        self.policy = policy

    # -- preparing -----------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.engine.model_name:
            raise NotFound(
                f"The model `{model}` does not exist. This server serves `{self.engine.model_name}`.",
                param="model",
            )

    def prepare(self, req: ChatCompletionRequest, caller: Caller) -> Job:
        self.check_model(req.model)
        messages: list[dict[str, Any]] = [{"role": m.role, "content": m.text()} for m in req.messages]
        return self.prepare_job(req, caller, messages, self.engine.render_chat, f"chatcmpl-{uuid.uuid4().hex}")

    def prepare_job(
        self,
        req: SamplingRequest,
        caller: Caller,
        messages: list[dict[str, Any]],
        render: Callable[[list[dict[str, Any]]], list[int]],
        job_id: str,
        *,
        route: str = "chat",
        param: str = "messages",
    ) -> Job:
        """Policy, prompt tokens, length check and sampling parameters for one engine request."""
        requested = max_tokens = req.max_new_tokens
        job = Job(
            id=job_id,
            request=req,
            caller=caller,
            messages=messages,
            prompt_ids=[],
            params=None,
            version=self.engine.current.name,
            started=time.time(),
            route=route,
        )
        if self.policy is not None:
            from serve.policy import RequestContext

            job.policy_ctx = RequestContext(api_key=caller.api_key, user=req.user, model=self.engine.model_name)
            checked = self.policy.check_input(messages, job.policy_ctx, max_tokens)
            job.input_decisions = list(checked.decisions)
            job.ruleset = checked.ruleset_version
            job.messages = messages = checked.messages
            max_tokens = checked.max_tokens
            if checked.blocked:
                job.refusal = checked.refusal or "This request was blocked by the operator's policy."
        job.prompt_ids = render(messages)
        if job.refusal is not None:
            return job
        room = self.engine.max_model_len - len(job.prompt_ids)
        if requested is None and max_tokens is not None and room >= 1:
            # A policy's output cap bounds "as long as fits"; it must not turn it into a context-length 400.
            max_tokens = min(max_tokens, room)
        max_tokens = self.engine.check_length(len(job.prompt_ids), max_tokens, param)
        job.params = self._sampling_params(req, max_tokens)
        return job

    def _sampling_params(self, req: SamplingRequest, max_tokens: int) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        structured = None
        response_format = getattr(req, "response_format", None)
        if response_format is not None and response_format.type == "json_object":
            structured = StructuredOutputsParams(json_object=True)
        elif response_format is not None and response_format.type == "json_schema":
            spec = response_format.json_schema or {}
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise BadRequest(
                    "response_format.json_schema.schema: give the JSON schema object the output must follow",
                    param="response_format.json_schema.schema",
                )
            structured = StructuredOutputsParams(json=schema)
        logit_bias: dict[int, float] | None = None
        if req.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError as exc:
                raise BadRequest(
                    f"logit_bias: keys must be token ids given as strings (got {list(req.logit_bias)[:3]})",
                    param="logit_bias",
                ) from exc
            vocab = len(self.engine.tokenizer)
            bad = [k for k, v in logit_bias.items() if not 0 <= k < vocab or not -100 <= v <= 100]
            if bad:
                raise BadRequest(
                    f"logit_bias: token ids must be in [0, {vocab}) with biases in [-100, 100] (bad: {bad[:3]})",
                    param="logit_bias",
                )
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None or req.top_k == -1 else req.top_k,
                min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                seed=req.seed,
                ignore_eos=req.ignore_eos,
                logprobs=req.logprobs_count(),
                logit_bias=logit_bias,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
            )
        except (ValueError, TypeError) as exc:
            # SamplingParams validates combinations itself; its message names the field.
            raise BadRequest(str(exc), param=_guess_param(str(exc))) from exc

    # -- running -------------------------------------------------------------------------------

    async def start(self, job: Job) -> AsyncIterator[Delta]:
        """Begin generation; returns an iterator of text deltas (policy applied) per choice.

        The engine accepts or rejects the request before this returns, so a bad request
        becomes an HTTP error rather than a broken stream.
        """
        if job.refusal is not None:
            return self._refused(job)
        top_n = job.request.logprobs_count() or 0
        job.choices = [
            Choice(i, self.policy.output_filter(job.policy_ctx) if self.policy else None, top_n)
            for i in range(job.request.n)
        ]
        version_cm = self.engine.pin()
        version = version_cm.__enter__()
        job.version = version.name
        try:
            outputs = self.engine.generate(job.prompt_ids, job.params, job.id, version, priority=job.request.priority)
            first = await outputs.__anext__()
        except BaseException:
            version_cm.__exit__(None, None, None)
            raise
        return self._deltas(job, version, version_cm, outputs, first)

    async def _refused(self, job: Job) -> AsyncIterator[Delta]:
        job.choices = [Choice(i, None) for i in range(job.request.n)]
        job.first_token_at = time.time()
        for choice in job.choices:
            choice.text.append(job.refusal or "")
            choice.finish_reason = CONTENT_FILTER
            yield Delta(choice.index, job.refusal or "", CONTENT_FILTER)
        self._finish(job)

    async def _deltas(
        self, job: Job, version: ServedVersion, version_cm: Any, outputs: AsyncGenerator[Any, None], first: Any
    ) -> AsyncIterator[Delta]:
        try:
            out: Any = first
            while True:
                for comp in out.outputs:
                    choice = job.choices[comp.index]
                    if choice.done:
                        continue
                    if job.first_token_at is None:
                        job.first_token_at = time.time()
                    delta = self._advance(choice, comp)
                    if delta is not None:
                        yield delta
                if all(c.done for c in job.choices):
                    break
                try:
                    out = await outputs.__anext__()
                except StopAsyncIteration:
                    break
        except BaseException:
            job.status = "aborted"
            raise
        finally:
            await outputs.aclose()  # aborts the engine request if it is still running
            version_cm.__exit__(None, None, None)
            self._finish(job)
            for choice in job.choices:
                if choice.filter is not None:
                    choice.filter.close()  # frees the matcher's stream state, also after an abort

    def _advance(self, choice: Choice, comp: Any) -> Delta | None:
        choice.raw.append(comp.text)
        choice.tokens += len(comp.token_ids)
        logprobs = self._logprobs(comp, choice.top_n) if comp.logprobs else None
        if logprobs:
            choice.logprobs.extend(logprobs)
        emit, stopped = comp.text, False
        if choice.filter is not None:
            step = choice.filter.feed(comp.text)
            emit, stopped = step.emit, step.stopped
            if stopped and step.refusal:
                emit += step.refusal
            if not stopped and comp.finish_reason is not None:
                end = choice.filter.finish()
                emit += end.emit
                stopped = end.stopped
                if stopped and end.refusal:
                    emit += end.refusal
        finish = CONTENT_FILTER if stopped else comp.finish_reason
        if finish is not None:
            choice.finish_reason = finish
        choice.text.append(emit)
        if not emit and finish is None and not logprobs:
            return None
        return Delta(choice.index, emit, finish, logprobs)

    def _logprobs(self, comp: Any, top_n: int) -> list[TokenLogprob]:
        result = []
        for token_id, top in zip(comp.token_ids, comp.logprobs, strict=False):
            chosen = top.get(token_id)
            entries = sorted(top.items(), key=lambda kv: kv[1].rank or 0)
            result.append(
                TokenLogprob(
                    token=self._decoded(token_id, chosen),
                    logprob=max(chosen.logprob, -9999.0) if chosen else -9999.0,
                    bytes=list(self._decoded(token_id, chosen).encode()),
                    top_logprobs=[
                        TopLogprob(
                            token=self._decoded(t, lp),
                            logprob=max(lp.logprob, -9999.0),
                            bytes=list(self._decoded(t, lp).encode()),
                        )
                        for t, lp in entries
                        if lp.rank is not None and lp.rank <= top_n
                    ][:top_n],
                )
            )
        return result

    def _decoded(self, token_id: int, lp: Any) -> str:
        if lp is not None and lp.decoded_token is not None:
            return str(lp.decoded_token)
        return str(self.engine.tokenizer.decode([token_id]))

    # -- finishing -----------------------------------------------------------------------------

    def usage(self, job: Job) -> UsageInfo:
        completion = sum(c.tokens for c in job.choices)
        return UsageInfo(
            prompt_tokens=len(job.prompt_ids) if job.refusal is None else 0,
            completion_tokens=completion,
            total_tokens=(len(job.prompt_ids) if job.refusal is None else 0) + completion,
        )

    def running_usage(self, job: Job, index: int) -> UsageInfo | None:
        """Usage of one choice so far, for `stream_options.continuous_usage_stats` (vLLM counts per choice)."""
        if not job.request.continuous_usage:
            return None
        prompt = len(job.prompt_ids) if job.refusal is None else 0
        done = job.choices[index].tokens if index < len(job.choices) else 0
        return UsageInfo(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)

    def _finish(self, job: Job) -> None:
        now = time.time()
        usage = self.usage(job)
        route = job.route
        self.metrics.request_latency.labels(route, str(job.request.stream).lower()).observe(now - job.started)
        if job.first_token_at is not None:
            self.metrics.ttft.labels(route).observe(job.first_token_at - job.started)
        self.metrics.prompt_tokens.labels(self.engine.model_name, job.version).inc(usage.prompt_tokens)
        self.metrics.completion_tokens.labels(self.engine.model_name, job.version).inc(usage.completion_tokens)
        if self.recorder is None:
            return
        decisions = [msgspec.convert(d, PolicyDecision, from_attributes=True) for d in job.input_decisions]
        for choice in job.choices:
            if choice.filter is not None:
                decisions.extend(
                    msgspec.structs.replace(
                        msgspec.convert(d, PolicyDecision, from_attributes=True), choice=choice.index
                    )
                    for d in choice.filter.decisions
                )
        req = job.request
        # Job and Choice hold status, route and finish reason as plain strings; the record's Literal types
        # name the values they may take, and every reader validates them (tests/core/test_records_contract.py).
        record = CompletionRecord(
            id=job.id,
            created=job.started,
            model=self.engine.model_name,
            version=job.version,
            status=cast("Status", job.status),
            messages=[Message(role=m["role"], content=m["content"]) for m in job.messages],
            endpoint=cast("Endpoint", job.route),
            params=req.model_dump(exclude={"messages", "prompt", "user", "metadata"}, exclude_none=True),
            choices=[
                ChoiceRecord(
                    index=c.index,
                    text="".join(c.text),
                    raw_text="".join(c.raw) if c.filter is not None and c.raw != c.text else None,
                    finish_reason=cast("FinishReason | None", c.finish_reason),
                    completion_tokens=c.tokens,
                )
                for c in job.choices
            ],
            usage=Usage(
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
            ),
            latency_s=now - job.started,
            ttft_s=None if job.first_token_at is None else job.first_token_at - job.started,
            user=req.user,
            key=job.caller.key_id,
            metadata=getattr(req, "metadata", None),
            policy=PolicyTrace(ruleset=job.ruleset, decisions=decisions),
        )
        self.recorder.completion(record)
        if self.policy is not None:
            for choice in job.choices:
                if choice.filter is None:
                    continue
                pair = self.policy.policy_pair(
                    job.messages,
                    choice.filter.original_text,
                    choice.filter.final_text,
                    choice.filter.decisions,
                    refusal=choice.filter.refusal,
                )
                if pair is not None:
                    self.recorder.policy_pair(f"pp-{job.id}-{choice.index}", job.id, pair)

    # -- shaping responses ---------------------------------------------------------------------

    async def complete(self, job: Job) -> ChatCompletionResponse:
        async for _ in await self.start(job):
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
            usage=self.usage(job),
            system_fingerprint=job.version,
        )

    async def open_stream(self, job: Job) -> AsyncIterator[str]:
        """Start the job, then return its SSE lines: errors before the first token become HTTP errors."""
        deltas = await self.start(job)
        return self._sse(job, deltas)

    async def _sse(self, job: Job, deltas: AsyncIterator[Delta]) -> AsyncIterator[str]:
        created = int(job.started)

        def chunk(choices: list[StreamChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(
                id=job.id,
                created=created,
                model=self.engine.model_name,
                choices=choices,
                usage=usage,
                system_fingerprint=job.version,
            )
            # vLLM's server leaves `usage` out of the chunks that carry none.
            return f"data: {body.model_dump_json(exclude={'usage'} if usage is None else None)}\n\n"

        try:
            for i in range(job.request.n):
                yield chunk(
                    [StreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))],
                    self.running_usage(job, i),
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
                    self.running_usage(job, d.index),
                )
            if job.request.include_usage:
                yield chunk([], self.usage(job))
        except Exception as exc:  # the 200 is already sent: the error goes out as the next chunk
            _, body = to_error(exc)
            logger.exception("stream %s failed", job.id)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"


def _guess_param(message: str) -> str | None:
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed", "n", "logprobs"):
        if message.startswith(name) or f" {name} " in message or f"`{name}`" in message:
            return name
    return None
