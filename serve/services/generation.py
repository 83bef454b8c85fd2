"""The generation pipeline shared by chat and text completions: prepare → start → deltas → finish.

`prepare` applies the input policy, renders the prompt, checks the context length
and builds the sampling parameters; nothing runs yet. `start` pins the request to
the version active now and awaits the engine's first output, so the engine's
validation errors surface as HTTP errors before any byte of a stream is sent. The
deltas it returns pass through the output policy, one filter per choice; when they
end — finished, aborted (the consumer closed them) or failed — the engine request
is closed, the version released and the request finished (`serve/services/finish.py`).

A stream asks the engine for each step's new tokens (`RequestOutputKind.DELTA`); a JSON request for its
final output only (`FINAL_ONLY`, as vLLM's server does): one output per choice holding the whole text, fed
to the output filter at once. Its whole generation then runs inside `start`'s first await, so a client
leaving or the engine failing there ends the request as `_deltas` would (aborted, recorded); only the
engine refusing the request (a client error) ends it unrecorded, as before any first output. A JSON request
has no time to first token: TTFT (metric, record, canary signal) counts streamed requests only.

Chat and completions only shape what this yields; they share this one generator,
so JSON responses and SSE streams give the same text for the same tokens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.canary import routing_identity
from serve.errors import NotFound, SecondstageError
from serve.protocol import SamplingRequest, TokenLogprob, UsageInfo
from serve.services.finish import finish_job
from serve.services.logprobs import token_logprobs
from serve.services.sampling import sampling_params

if TYPE_CHECKING:
    from serve.caller import Caller
    from serve.canary import SignalRecorder
    from serve.engine import ModelEngine
    from serve.metrics import Metrics
    from serve.services.records import Recorder

CONTENT_FILTER = "content_filter"


@dataclass(frozen=True)
class Prompt:
    """What the engine is asked, as the input policy sees it (`messages`), and how it becomes token ids."""

    messages: list[dict[str, Any]]
    chat_template: bool = True
    token_ids: list[int] | None = None

    @classmethod
    def chat(cls, messages: list[dict[str, Any]]) -> Prompt:
        """Messages rendered with the model's chat template."""
        return cls(messages)

    @classmethod
    def text(cls, text: str) -> Prompt:
        """Raw text, tokenized as is (after the input policy, which may rewrite it)."""
        return cls([{"role": "user", "content": text}], chat_template=False)

    @classmethod
    def tokens(cls, ids: list[int], text: str) -> Prompt:
        """Token ids the client gave: the engine gets them unchanged; policies check their text."""
        return cls([{"role": "user", "content": text}], chat_template=False, token_ids=ids)


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
    clock: float = field(default_factory=time.perf_counter)
    """When the job began on the monotonic clock; durations count from here (`started` is wall-clock)."""
    first_token_at: float | None = None
    """On the monotonic clock, like `clock`."""
    status: str = "ok"
    failed: bool = False
    """The engine or the pipeline raised mid-generation (not a client leaving): an error against the version."""
    canary: tuple[str, str] | None = None
    """(run, role) while a canary runs: which run and side (canary, incumbent) this request counts for."""
    route: str = "chat"
    index_offset: int = 0  # /v1/completions numbers choices across prompts

    def usage(self) -> UsageInfo:
        completion = sum(c.tokens for c in self.choices)
        return UsageInfo(
            prompt_tokens=len(self.prompt_ids) if self.refusal is None else 0,
            completion_tokens=completion,
            total_tokens=(len(self.prompt_ids) if self.refusal is None else 0) + completion,
        )

    def running_usage(self, index: int) -> UsageInfo | None:
        """Usage of one choice so far, for `stream_options.continuous_usage_stats` (vLLM counts per choice)."""
        if not self.request.continuous_usage:
            return None
        prompt = len(self.prompt_ids) if self.refusal is None else 0
        done = self.choices[index].tokens if index < len(self.choices) else 0
        return UsageInfo(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


def check_model(engine: ModelEngine, model: str | None) -> None:
    """A request naming another model is a 404 naming `model`; naming none means the served one."""
    if model is not None and model != engine.model_name:
        raise NotFound(
            f"The model `{model}` does not exist. This server serves `{engine.model_name}`.",
            param="model",
        )


class Pipeline:
    def __init__(
        self,
        engine: ModelEngine,
        recorder: Recorder | None,
        metrics: Metrics,
        policy: Any | None = None,
        signals: SignalRecorder | None = None,
    ) -> None:
        self.engine = engine
        self.recorder = recorder
        self.metrics = metrics
        self.policy = policy
        self.signals = signals

    # -- preparing -----------------------------------------------------------------------------

    def prepare(
        self,
        req: SamplingRequest,
        caller: Caller,
        prompt: Prompt,
        job_id: str,
        *,
        route: str = "chat",
        param: str = "messages",
    ) -> Job:
        """Policy, prompt tokens, length check and sampling parameters for one engine request."""
        messages = prompt.messages
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
            from core.policy import RequestContext

            job.policy_ctx = RequestContext(api_key=caller.key_id, user=caller.name, model=self.engine.model_name)
            checked = self.policy.check_input(messages, job.policy_ctx, max_tokens)
            job.input_decisions = list(checked.decisions)
            job.ruleset = checked.ruleset_version
            job.messages = messages = checked.messages
            max_tokens = checked.max_tokens
            if checked.blocked:
                job.refusal = checked.refusal  # the input stage names the blocking rule's refusal
        job.prompt_ids = self._render(prompt, messages)
        if job.refusal is not None:
            return job
        room = self.engine.max_model_len - len(job.prompt_ids)
        if requested is None and max_tokens is not None and room >= 1:
            # A policy's output cap bounds "as long as fits"; it must not turn it into a context-length 400.
            max_tokens = min(max_tokens, room)
        max_tokens = self.engine.check_length(len(job.prompt_ids), max_tokens, param)
        job.params = sampling_params(req, max_tokens, self.engine.tokenizer)
        return job

    def _render(self, prompt: Prompt, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of `messages`, the prompt as the input policy left it."""
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.chat_template:
            return self.engine.render_chat(messages)
        # The input policy may have rewritten the prompt; raw completions take no system messages.
        return list(self.engine.tokenizer.encode(messages[-1]["content"], add_special_tokens=True))

    # -- running -------------------------------------------------------------------------------

    async def start(self, job: Job) -> AsyncGenerator[Delta, None]:
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
        async with contextlib.AsyncExitStack() as stack:
            # Sticky routing: the same identity (key + `user`) gets the same version while a canary runs.
            identity = routing_identity(job.caller.key_id, job.request.user)
            version = stack.enter_context(self.engine.pin(identity))
            job.version = version.name
            job.canary = self.engine.role_of(version)
            outputs = self.engine.generate(job.prompt_ids, job.params, job.id, version, priority=job.request.priority)
            stack.push_async_callback(outputs.aclose)  # closing aborts the engine request if it still runs
            try:
                first = await outputs.__anext__()
            except BaseException as exc:
                if not job.request.stream and not _refused_by_engine(exc):
                    # FINAL_ONLY: the whole generation ran in this await; it ends as in `_deltas`.
                    job.status = "aborted"
                    job.failed = isinstance(exc, Exception)
                    self._end(job)
                raise
            # Started: the version pin and the engine stream now belong to the deltas, to their end.
            held = stack.pop_all()
        return self._deltas(job, held, outputs, first)

    async def _refused(self, job: Job) -> AsyncGenerator[Delta, None]:
        job.choices = [Choice(i, None) for i in range(job.request.n)]
        if job.request.stream:
            job.first_token_at = time.perf_counter()
        for choice in job.choices:
            choice.text.append(job.refusal or "")
            choice.finish_reason = CONTENT_FILTER
            yield Delta(choice.index, job.refusal or "", CONTENT_FILTER)
        self._finish(job)

    async def _deltas(
        self, job: Job, held: contextlib.AsyncExitStack, outputs: AsyncIterator[Any], first: Any
    ) -> AsyncGenerator[Delta, None]:
        try:
            async with held:  # on the way out: close the engine stream, then release the version
                out: Any = first
                while True:
                    for comp in out.outputs:
                        choice = job.choices[comp.index]
                        if choice.done:
                            continue
                        if job.first_token_at is None and job.request.stream:
                            job.first_token_at = time.perf_counter()  # a JSON answer has no first token
                        delta = self._advance(choice, comp)
                        if delta is not None:
                            yield delta
                    if all(c.done for c in job.choices):
                        break
                    try:
                        out = await outputs.__anext__()
                    except StopAsyncIteration:
                        break
        except BaseException as exc:
            job.status = "aborted"
            # GeneratorExit / CancelledError: the client went; anything else failed on the version's watch.
            job.failed = isinstance(exc, Exception)
            raise
        finally:
            self._end(job)

    def _end(self, job: Job) -> None:
        self._finish(job)
        for choice in job.choices:
            if choice.filter is not None:
                choice.filter.close()  # frees the matcher's stream state, also after an abort

    def _advance(self, choice: Choice, comp: Any) -> Delta | None:
        choice.raw.append(comp.text)
        choice.tokens += len(comp.token_ids)
        logprobs = token_logprobs(comp, choice.top_n, self.engine.tokenizer) if comp.logprobs else None
        if logprobs:
            choice.logprobs.extend(logprobs)
        emit, stopped = comp.text, False
        if choice.filter is not None:
            # The filter owns block → refusal: `text` is what the client gets, refusal included.
            step = choice.filter.feed(comp.text)
            emit, stopped = step.text, step.stopped
            if not stopped and comp.finish_reason is not None:
                end = choice.filter.finish()
                emit += end.text
                stopped = end.stopped
        finish = CONTENT_FILTER if stopped else comp.finish_reason
        if finish is not None:
            choice.finish_reason = finish
        choice.text.append(emit)
        if not emit and finish is None and not logprobs:
            return None
        return Delta(choice.index, emit, finish, logprobs)

    def _finish(self, job: Job) -> None:
        finish_job(job, engine=self.engine, recorder=self.recorder, metrics=self.metrics, policy=self.policy)
        if self.signals is not None:
            self.signals.request(job)


def _refused_by_engine(exc: BaseException) -> bool:
    """The engine (or the version pin) refused the request before running it: the client's error, no record."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError

    return isinstance(exc, (VLLMClientError, GracefulHTTPError, SecondstageError))
