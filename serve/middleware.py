"""ASGI middleware: body-size limit (413), x-request-id echo, request counts by route and status.

The `route` label never comes from the client: it is the path template of the route the app matched
(e.g. `/admin/policies/reload`), one of the known routes for a request refused before routing (413),
or `other` (unknown paths, 404s). A client sending a million distinct paths adds no label value.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import PayloadTooLarge, to_error

_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/feedback",
    "/tokenize",
    "/detokenize",
    "/health",
    "/health/ready",
    "/metrics",
    "/admin/policies",
    "/admin/policies/reload",
)


def route_label(scope: Scope) -> str:
    """The request's `route` label: the matched route's template, a known path, or `other`."""
    route = scope.get("route")  # set by FastAPI's router on a (full or partial) match
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if isinstance(template, str):
        return template
    path = scope["path"]
    return path if path in _ROUTES else "other"


class _TooLarge(BaseException):
    """Raised from receive(); a BaseException so FastAPI's body parser does not turn it into a 400."""


class RequestMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: Any) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex
        status_seen: list[int] = []

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(message["status"])
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._reject(send_wrapped)
            self.metrics.count_http(route_label(scope), "413")
            return

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, receive_limited, send_wrapped)
        except _TooLarge:
            if not status_seen:
                await self._reject(send_wrapped)
        finally:
            self.metrics.count_http(route_label(scope), str(status_seen[0] if status_seen else 500))

    async def _reject(self, send: Send) -> None:
        status, body = to_error(
            PayloadTooLarge(
                f"request body is larger than the server's limit of {self.max_body_bytes} bytes "
                "(SECONDSTAGE_MAX_BODY_BYTES)"
            )
        )
        data = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": int(status),
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data})
