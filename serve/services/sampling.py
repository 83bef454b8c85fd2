"""Request → vLLM `SamplingParams`: defaults, `response_format`, `logit_bias`, and vLLM's own checks as 400s.

Shared by chat and text completions (both are `SamplingRequest`s). vLLM validates
parameter combinations itself; its message becomes the 400's message and the
parameter it names becomes `param`.
"""

from __future__ import annotations

from typing import Any

from serve.errors import BadRequest
from serve.protocol import SamplingRequest


def sampling_params(req: SamplingRequest, max_tokens: int, tokenizer: Any) -> Any:
    """The engine's parameters for `req`, with `max_tokens` already fitted to the context."""
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
        vocab = len(tokenizer)
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
            # Streams take each step's new tokens; a JSON answer only its end, as vLLM's own server asks:
            # one output per choice with the whole text, token ids and logprobs, instead of one per token
            # through vLLM's output handler and this pipeline (docs/performance.md, the API cost meter).
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )
    except (ValueError, TypeError) as exc:
        # SamplingParams validates combinations itself; its message names the field.
        raise BadRequest(str(exc), param=_guess_param(str(exc))) from exc


def _guess_param(message: str) -> str | None:
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "stop", "seed", "n", "logprobs"):
        if message.startswith(name) or f" {name} " in message or f"`{name}`" in message:
            return name
    return None
