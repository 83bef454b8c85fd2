"""ASGI middleware: body-size limit (413), x-request-id echo, request counts by route and status."""

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
    "/metrics",
)


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
        path = scope["path"]
        route = path if path in _ROUTES or path.startswith("/admin/") else "other"
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
            self.metrics.requests.labels(route, "413").inc()
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
            self.metrics.requests.labels(route, str(status_seen[0] if status_seen else 500)).inc()

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
