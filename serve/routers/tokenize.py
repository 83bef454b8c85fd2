"""POST /tokenize and /detokenize, as vLLM's server offers them."""

from __future__ import annotations

from fastapi import APIRouter

from serve.deps import CHAT_SCOPE, EngineDep
from serve.errors import BadRequest
from serve.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from serve.routers import error_responses
from serve.services.generation import check_model

router = APIRouter()


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=error_responses(400, 401, 403, 404, 413),
    dependencies=[CHAT_SCOPE],
)
async def tokenize(body: TokenizeRequest, engine: EngineDep) -> TokenizeResponse:
    check_model(engine, body.model)
    if body.messages is not None:
        tokens = engine.render_chat([{"role": m.role, "content": m.text()} for m in body.messages])
    else:
        tokens = list(engine.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens))
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=error_responses(400, 401, 403, 404, 413),
    dependencies=[CHAT_SCOPE],
)
async def detokenize(body: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    check_model(engine, body.model)
    vocab = len(engine.tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise BadRequest(f"tokens: ids must be in [0, {vocab}) (got {bad[:5]})", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))
