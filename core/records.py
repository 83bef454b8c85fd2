"""The records serve writes and align reads: one typed definition of every shape that crosses Redis or disk.

- `CompletionRecord` — one per chat/completions request (the `<p>:completions` stream and the
  `<p>:completion:<id>` lookup key), with its messages, choices, usage and policy decisions;
- `FeedbackRecord` — one per `POST /v1/feedback` (the `<p>:feedback` stream);
- `PolicyPair` — a preference pair an enforced output rule produced (the `<p>:policy_pairs` stream);
- `Manifest` — a model version's lineage, datasets, metrics and gate (`manifest.json` and `<p>:versions`).

They are msgspec Structs rather than dicts or pydantic models: encoding a Struct to JSON is what the log
writer does for every completion on the serving hot path, and msgspec does it several times faster than
`json.dumps` of a dict (the writer already speaks msgpack through msgspec); decoding validates while it
parses, so a reader gets typed objects or a `RecordError` naming the bad field, never a half-understood
dict. Closed value sets are `Literal` types: a record with `status: "finished"` does not decode.

Evolving the schema (every record carries `schema`, currently `SCHEMA`):
1. A new field always gets a default, so records written before it still decode.
2. Readers ignore fields they do not know, so records written by a newer server still decode.
3. Anything else — a renamed or removed field, a changed type or meaning, a narrowed value set — is a
   breaking change: bump `SCHEMA`, add the new number to `Schema`, and make readers handle both versions
   until no record of the old one remains. docs/architecture.md describes the current layout.

`encode(record)` gives the JSON bytes stored in Redis and on disk; `decode(raw, Type)` reads them back.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

SCHEMA: Final = 1
"""The record schema version written now (also the `schema` field of every stream entry)."""

Schema = Literal[1]
"""Schema versions readers accept: a breaking change adds its number here (see the module docstring)."""

BASE: Final = "base"
"""The version name of the base model without an adapter (a manifest's `parent` when trained fresh)."""

Role = Literal["system", "developer", "user", "assistant", "tool"]
Status = Literal["ok", "aborted"]
"""`ok`: the request ran to its end (or was refused by a policy); `aborted`: the client went or the engine failed."""
Endpoint = Literal["chat", "completions"]
FinishReason = Literal["stop", "length", "abort", "error", "repetition", "content_filter"]
"""vLLM's finish reasons, plus `content_filter` when a policy blocked the output."""
Thumbs = Literal["up", "down"]
RuleKind = Literal["keywords", "regex", "preset", "limit", "instructions", "unicode"]
RuleAction = Literal["block", "redact", "flag", "rewrite", "instruct", "limit", "strip"]
RuleMode = Literal["enforce", "shadow"]
RuleStage = Literal["input", "output"]

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Rating = Annotated[int, msgspec.Meta(ge=1, le=5)]


class RecordError(ValueError):
    """Bytes that are not a valid record of the expected type; the message names the field."""


# -- completion ------------------------------------------------------------------------------------------


class Message(msgspec.Struct, kw_only=True):
    """A chat message as the engine saw it (after input policies)."""

    role: Role
    content: str


class ChoiceRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One generated choice. `raw_text` (the model's text before output policies changed it) only when it differs."""

    index: NonNegative
    text: str
    raw_text: str | None = None
    finish_reason: FinishReason | None
    """None when the request was aborted before this choice finished."""
    completion_tokens: NonNegative


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    total_tokens: NonNegative = 0


class PolicyDecision(msgspec.Struct, kw_only=True):
    """One rule firing on one request (core.policy's `Decision`), plus the choice for output decisions."""

    rule_id: str
    kind: RuleKind
    action: RuleAction
    mode: RuleMode
    stage: RuleStage
    ruleset_version: str
    span: tuple[int, int] | None = None
    """Character offsets in the stage's text (a message for input, the choice's text for output)."""
    message_index: int | None = None
    """Input stage: which message the span is in."""
    detail: str | None = None
    choice: int | None = None
    """Output stage: which choice the decision is about."""


class PolicyTrace(msgspec.Struct, kw_only=True):
    ruleset: str | None = None
    """Content hash of the rule set that was active (None: policies disabled)."""
    decisions: list[PolicyDecision] = []


class CompletionRecord(msgspec.Struct, kw_only=True):
    """One chat or text completion request, written when it ends (finished, refused or aborted)."""

    schema: Schema = SCHEMA
    kind: Literal["completion"] = "completion"
    id: str
    created: float
    """Unix time the request started."""
    model: str
    version: str
    """The model version that produced it (pinned at the start)."""
    status: Status
    messages: list[Message]
    endpoint: Endpoint = "chat"
    params: dict[str, Any] = {}
    """Sampling parameters as the client gave them (open-ended: OpenAI's and vLLM's extensions)."""
    choices: list[ChoiceRecord]
    usage: Usage
    latency_s: float
    ttft_s: float | None = None
    user: str | None = None
    key: str | None = None
    """sha256 prefix of the API key, never the key."""
    metadata: dict[str, str] | None = None
    policy: PolicyTrace = msgspec.field(default_factory=PolicyTrace)

    def choice(self, index: int) -> ChoiceRecord | None:
        return next((c for c in self.choices if c.index == index), None)


# -- feedback and preference pairs -----------------------------------------------------------------------


class FeedbackRecord(msgspec.Struct, kw_only=True):
    """A user's judgement of one completion (`POST /v1/feedback`); at least one signal is set."""

    schema: Schema = SCHEMA
    kind: Literal["feedback"] = "feedback"
    id: str
    completion_id: str
    created: float
    choice_index: NonNegative = 0
    thumbs: Thumbs | None = None
    rating: Rating | None = None
    comment: str | None = None
    correction: str | None = None
    preferred_choice: NonNegative | None = None
    user: str | None = None
    """The request's `user` field: metadata the client sets, never an identity."""
    key: str | None = None
    """Who posted it: the key id of the authenticated API key (None: anonymous). What per-identity caps key on."""
    policy: PolicyTrace | None = None
    """What the policies did to `correction` when serve accepted it (core/policy/correction.py): the rule set
    and its decisions, spans in the text as the user sent it; `correction` is stored as they left it. None: no
    correction, or the server ran without policies."""


class PolicyPair(msgspec.Struct, kw_only=True):
    """A preference pair from an enforced output rule: rejected = the model's text, chosen = the enforced one.

    `id` and `completion_id` are set when the pair is recorded (the policy engine does not know them).
    """

    schema: Schema = SCHEMA
    kind: Literal["policy_pair"] = "policy_pair"
    id: str | None = None
    completion_id: str | None = None
    prompt: list[Message]
    chosen: str
    rejected: str
    rule_ids: list[str] = []
    ruleset_version: str = ""


# -- versions --------------------------------------------------------------------------------------------


class Manifest(msgspec.Struct, kw_only=True):
    """A model version: lineage, the data it was trained on, training metrics and the gate's report."""

    schema: Schema = SCHEMA
    version: str
    parent: str = BASE
    """Version the adapter was trained from."""
    base_model: str
    created: float = msgspec.field(default_factory=time.time)
    feedback_ids: list[str] = []
    policy_pair_ids: list[str] = []
    datasets: dict[str, int] = {}
    """Rows per dataset kind (kto, dpo) and per source, plus what was skipped and why."""
    metrics: dict[str, float] = {}
    gate: dict[str, Any] = {}
    lora_rank: int = 8


# -- encoding --------------------------------------------------------------------------------------------

Record = CompletionRecord | FeedbackRecord | PolicyPair | Manifest
R = TypeVar("R", CompletionRecord, FeedbackRecord, PolicyPair, Manifest)


def _enc_hook(obj: Any) -> Any:
    # Training metrics and gate values can be numpy/torch scalars; store them as plain numbers.
    item = getattr(obj, "item", None)
    if callable(item):
        return item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__} in a record")


_ENCODER = msgspec.json.Encoder(enc_hook=_enc_hook)
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t) for t in (CompletionRecord, FeedbackRecord, PolicyPair, Manifest)
}


def encode(record: Record) -> bytes:
    """The record as compact UTF-8 JSON (what goes into a stream entry's `data`, a lookup key, a manifest)."""
    return _ENCODER.encode(record)


def encode_text(record: Record) -> str:
    return _ENCODER.encode(record).decode()


def decode(raw: bytes | str, cls: type[R]) -> R:
    """Parse and validate `raw` as a `cls` record; unknown fields are ignored. Raises `RecordError`."""
    try:
        result: R = _DECODERS[cls].decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RecordError(f"not a valid {cls.__name__}: {exc}") from exc
    return result
