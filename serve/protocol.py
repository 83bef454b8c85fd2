"""Wire schemas of the OpenAI-compatible API (requests, responses, stream chunks, feedback).

Field names and types follow OpenAI's API as vLLM's server implements it; the
extras vLLM accepts through `extra_body` (top_k, min_p, ...) are accepted too.
Validation here is what turns bad input into a 400 that names the parameter.

Limits on hostile input (docs/api.md, "Limits on input"): every list a client sends has a bound
(`MAX_*` below; the body itself is bounded by SECONDSTAGE_MAX_BODY_BYTES), numbers the engine receives
have ranges, floats must be finite, and text must be Unicode: a lone surrogate (JSON's `"\\ud800"`)
anywhere in a request, extra fields included, is a 400 naming its dotted path (`messages.0.content`),
because it cannot be encoded as UTF-8 and would fail the tokenizer or the log record later.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

MAX_MESSAGES = 2048
"""Most messages in one chat request."""
MAX_CONTENT_PARTS = 1024
"""Most content parts in one message."""
MAX_STOP = 4
"""Most stop sequences (OpenAI's limit)."""
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_METADATA = 16
"""Most metadata pairs; keys up to 64 characters, values up to 512 (OpenAI's limits)."""
MAX_DETOKENIZE = 100_000

_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(value: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string of a parsed JSON value (object keys too) with its path; iterative, so depth costs no stack."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            yield path, v
        elif isinstance(v, dict):
            for k, item in reversed(v.items()):
                if isinstance(k, str):
                    yield (*path, k), k
                stack.append(((*path, k), item))
        elif isinstance(v, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(v))))


def _any_lone_surrogate(value: Any) -> bool:
    """The fast pass: no paths kept (most requests have no surrogate, and some have 100k values)."""
    stack = [value]
    pop, extend = stack.pop, stack.extend
    while stack:
        v = pop()
        if isinstance(v, str):
            if not v.isascii() and _SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            extend(v)  # the keys
            extend(v.values())
        elif isinstance(v, list):
            extend(v)
    return False


def _refuse_lone_surrogates(data: Any, title: str) -> Any:
    if not _any_lone_surrogate(data):
        return data
    for path, text in _strings(data):
        if text.isascii():
            continue
        m = _SURROGATE.search(text)
        if m is not None:
            raise ValidationError.from_exception_data(
                title,
                [
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "lone_surrogate",
                            "holds a lone UTF-16 surrogate (U+{code}) at position {position}, which is not Unicode "
                            "text; send valid UTF-8 (a character beyond U+FFFF is one surrogate pair in JSON, "
                            "e.g. \\ud83d\\ude00)",
                            {"code": f"{ord(m.group()):04X}", "position": m.start()},
                        ),
                        # A key can be the culprit: its place in the path is written as its JSON escape.
                        loc=tuple(
                            p.encode("utf-8", "backslashreplace").decode() if isinstance(p, str) else p for p in path
                        ),
                        input=text,
                    )
                ],
            )
    return data


class _Unicode(BaseModel):
    """A request body: refuses lone surrogates anywhere in it, with the dotted path of the first one."""

    @model_validator(mode="before")
    @classmethod
    def _unicode_only(cls, data: Any) -> Any:
        # A ValidationError raised here keeps its own locations: they are paths from the body's root.
        return _refuse_lone_surrogates(data, cls.__name__)


class _Base(BaseModel):
    # Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so
    # clients sending newer fields keep working.
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    # Before the union is tried, so the 400 names `messages.N.content`, not one of the union's members.
    @field_validator("content", mode="before")
    @classmethod
    def _content_parts(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts per message (got {len(v)}); send fewer")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")


class StreamOptions(_Base):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# Integers the engine receives must fit its int64 fields; beyond that they are a 400, not an engine error.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Field(ge=0, le=2**63 - 1)]
# NaN and infinity parse from JSON (`NaN`, `1e999`) but mean nothing as a sampling parameter.
Finite = Annotated[float, Field(allow_inf_nan=False)]
MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class SamplingRequest(_Unicode, _Base):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    temperature: Finite | None = Field(None, ge=0.0, le=2.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Finite = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Finite] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    user: str | None = None
    # vLLM extensions (extra_body).
    top_k: int | None = Field(None, ge=-1, le=2**63 - 1)
    min_p: Finite | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Finite | None = Field(None, gt=0.0)
    min_tokens: int = Field(0, ge=0, le=2**63 - 1)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    priority: Int64 = 0

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences (got {len(stops)}); send fewer")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    # Field validators (not model validators) so the 400 names the parameter; `stream` is declared first.
    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """Top alternatives to return per token; None when logprobs are not requested."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM's `continuous_usage_stats`); as in vLLM, only with include_usage."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI: use max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    metadata: dict[MetadataKey, MetadataValue] | None = Field(None, max_length=MAX_METADATA)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v > 0 and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs: true")
        return v

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(..., description="Text, texts, or token ids.")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _token_ids(cls, v: Any) -> Any:
        # Before the union is tried, so the 400 names `prompt` and says what is wrong, not "should be a string".
        if isinstance(v, list):
            ids = [t for p in v for t in (p if isinstance(p, list) else [p])]
            bad = [t for t in ids if isinstance(t, int) and not 0 <= t <= 2**63 - 1]
            if bad:
                raise ValueError(f"token ids must be in [0, 2**63 - 1] (got {bad[:3]})")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("token-id prompts must not be empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("suffix is not supported")
        return v

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str = Field(description="The model version that produced this response.")


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_role(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Only the first chunk of a choice names the role; later deltas leave the key out, as OpenAI and vLLM do.
        data: dict[str, Any] = handler(self)
        if data.get("role") is None:
            data.pop("role", None)
        return data


class StreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[StreamChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str


class TokenizeRequest(_Unicode, _Base):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, max_length=MAX_MESSAGES)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(_Unicode, _Base):
    model: str | None = None
    tokens: list[TokenId] = Field(..., max_length=MAX_DETOKENIZE, description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    prompt: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "secondstage"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    version: str | None = Field(None, description="secondstage: the model version new requests are served with.")
    wanted_version: str | None = Field(
        None,
        description="secondstage: the active version in Redis; differs from `version` while this replica has not "
        "loaded it (version skew: it retries with backoff).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str = Field(description="What was wrong, naming the parameter and the value received.")
    type: str = Field(description="Error class, e.g. BadRequestError, NotFoundError.")
    param: str | None = Field(None, description="The request parameter at fault, when there is one.")
    code: int = Field(description="The HTTP status.")


class ErrorResponse(BaseModel):
    """Every error body: OpenAI's `{"error": {...}}` shape."""

    error: ErrorInfo


class FeedbackRequest(_Unicode):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(..., min_length=1, description="The `id` of the chat completion this is about.")
    choice_index: int = Field(0, ge=0, description="Which choice the thumbs/rating/comment/correction refer to.")
    thumbs: Literal["up", "down"] | None = None
    rating: int | None = Field(None, ge=1, le=5)
    comment: str | None = Field(None, max_length=10_000)
    correction: str | None = Field(None, min_length=1, max_length=20_000, description="The answer the user wanted.")
    preferred_choice: int | None = Field(None, ge=0, description="For n>1: the index of the best choice.")
    user: str | None = None

    @model_validator(mode="after")
    def _some_signal(self) -> FeedbackRequest:
        if all(getattr(self, f) is None for f in ("thumbs", "rating", "comment", "correction", "preferred_choice")):
            raise ValueError("give at least one of thumbs, rating, comment, correction, preferred_choice")
        return self


class FeedbackResponse(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    completion_id: str
    created: int
