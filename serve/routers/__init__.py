"""Routers: translate HTTP to service calls and back; no logic of their own."""

from __future__ import annotations

from typing import Any

from serve.protocol import ErrorResponse

_DESCRIPTIONS: dict[int | str, str] = {
    400: "Invalid request: the message says what, `param` names the field (validation errors are 400, not 422).",
    404: "Unknown model (or completion id); `param` names it.",
    413: "Request body over the server's limit (SECONDSTAGE_MAX_BODY_BYTES).",
    503: "Not available now (engine unhealthy, or the feature is switched off).",
    # Declaring the class also keeps FastAPI from advertising its default 422 body, which we never send.
    "4XX": "Any other client error (e.g. 405 for a wrong method), in the same shape.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the errors a route can return, all in OpenAI's `{"error": {...}}` shape."""
    keys: list[int | str] = [*statuses, "4XX"]
    return {key: {"model": ErrorResponse, "description": _DESCRIPTIONS[key]} for key in keys}
