"""Routers: translate HTTP to service calls and back; no logic of their own."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve.protocol import ErrorResponse

_DESCRIPTIONS: dict[int | str, str] = {
    400: "Invalid request: the message says what, `param` names the field (validation errors are 400, not 422).",
    401: "Missing, unknown or revoked API key (`code: invalid_api_key`); send `Authorization: Bearer <key>`.",
    403: "The API key lacks the scope this route needs (chat, feedback or admin); the message names it.",
    404: "Unknown model (or completion id); `param` names it.",
    413: "Request body over the server's limit (SECONDSTAGE_MAX_BODY_BYTES).",
    429: "A per-key limit (requests, tokens, feedback per minute; requests in flight): `Retry-After` says when "
    "to retry, `x-ratelimit-*` headers say where the key stands, `code` is `rate_limit_exceeded`.",
    503: "Not available now (engine unhealthy, or the feature is switched off).",
    # Declaring the class also keeps FastAPI from advertising its default 422 body, which we never send.
    "4XX": "Any other client error (e.g. 405 for a wrong method), in the same shape.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can return, all in OpenAI's `{"error": {...}}` shape."""
    keys: list[int | str] = [*statuses, "4XX"]
    return {key: {"model": ErrorResponse, "description": _DESCRIPTIONS[key]} for key in keys}


class EventStream(StreamingResponse):
    """An SSE response that closes its event generator as soon as the response ends, however it ends.

    Starlette cancels the sending task when the client leaves but leaves the body generator to the
    garbage collector; closing it here runs its `finally` blocks now, which aborts the engine request
    instead of letting it generate for nobody until a collection happens.
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
