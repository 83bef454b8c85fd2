"""Routers: translate HTTP to service calls and back; no logic of their own."""

from __future__ import annotations

import asyncio
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

    It streams as Starlette's StreamingResponse does for servers before ASGI spec 2.4 (uvicorn's is 2.3):
    the body is written while a second task waits for the client's disconnect, and a disconnect stops the
    writing. Starlette runs the two in an anyio task group; here the request's own task writes and a plain
    asyncio task listens, which costs a fraction per stream (the task group's cancel scope was ~3% of a
    64-token stream's CPU in the API process; bench/api_cost.py, docs/performance.md).
    """

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._stream(receive, send)
        finally:
            await self._events.aclose()
        if self.background is not None:
            await self.background()

    async def _stream(self, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        writing = True

        def client_left(_: asyncio.Task[None]) -> None:
            if writing:
                task.cancel()  # stops the writing at its next await (the engine, or a send)

        listener = asyncio.ensure_future(self.listen_for_disconnect(receive))
        listener.add_done_callback(client_left)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not listener.done() or listener.cancelled():
                raise  # cancelled from outside (the server stopping): not ours to swallow
            if listener.exception() is not None:
                raise listener.exception() from None  # type: ignore[misc]
            if task.uncancel() > 0:
                raise  # cancelled from outside as well
            # The client left: the response ends here, as with Starlette's task group.
        finally:
            writing = False
            listener.remove_done_callback(client_left)
            listener.cancel()
