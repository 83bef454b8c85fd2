"""Domain errors and the one table that maps exceptions to OpenAI-shaped HTTP errors.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with
`code` the HTTP status (vLLM's server does the same). Domain errors carry their
status; anything unknown is a 500 — a bare ValueError is our bug, not the client's.
Every path that answers with an error goes through `to_error`: the exception
handlers, the body-size middleware (413) and the error chunk of a stream that
already sent its 200.
"""

from __future__ import annotations

import logging
import math
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("secondstage.errors")


class SecondstageError(Exception):
    """Root of the errors a client can be told about.

    `details` are extra fields inside the `error` object (e.g. the rule file a reload
    refused); `context` are fields beside it (e.g. the version still active); `headers`
    go on the HTTP response (e.g. `Retry-After` on a 429).
    """

    # An int, not only HTTPStatus: 499 (nginx's "client closed request") is no HTTPStatus member.
    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "InternalServerError"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        details: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}
        self.context = context or {}
        self.headers = headers or {}


class BadRequest(SecondstageError):
    status = HTTPStatus.BAD_REQUEST
    type = "BadRequestError"


class NotFound(SecondstageError):
    status = HTTPStatus.NOT_FOUND
    type = "NotFoundError"


class PayloadTooLarge(SecondstageError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    type = "RequestEntityTooLargeError"


class Unprocessable(SecondstageError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    type = "UnprocessableEntityError"


class PolicyRejected(Unprocessable):
    """A policy reload refused its rule files; the rules loaded before stay active."""

    type = "PolicyError"


class ClientClosed(SecondstageError):
    """The client went away before its answer was ready: nobody reads the body, but logs and metrics do."""

    status = 499
    type = "ClientClosedRequest"


class RateLimited(SecondstageError):
    """A per-key limit refused the request (`serve/limits.py`), in OpenAI's shape.

    As OpenAI: `type` names the limit (`requests`, `tokens`; here also `feedback`, `concurrency`),
    `code` is `rate_limit_exceeded`; `Retry-After` (seconds) and `retry-after-ms` say when to retry,
    beside the x-ratelimit-* headers of the limits checked.
    """

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, limit: str, retry_after_s: float, headers: dict[str, str]) -> None:
        wait_ms = max(1, math.ceil(retry_after_s * 1000))
        super().__init__(
            message,
            details={"code": "rate_limit_exceeded"},
            headers={**headers, "retry-after": str(math.ceil(wait_ms / 1000)), "retry-after-ms": str(wait_ms)},
        )
        self.type = limit
        self.retry_after_s = retry_after_s


class ReloadInProgress(SecondstageError):
    """A policy reload was asked for while another one runs (one at a time, off the event loop)."""

    status = HTTPStatus.CONFLICT
    type = "ConflictError"


class Unauthorized(SecondstageError):
    """No API key, or one the server does not know (or that was revoked): 401 `invalid_api_key`, as OpenAI says."""

    status = HTTPStatus.UNAUTHORIZED
    type = "AuthenticationError"

    def __init__(self, message: str) -> None:
        super().__init__(message, details={"code": "invalid_api_key"})


class Forbidden(SecondstageError):
    """A valid key without the scope the route needs; the message names the scope."""

    status = HTTPStatus.FORBIDDEN
    type = "PermissionDeniedError"


class Unavailable(SecondstageError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"


def error_body(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": int(status)}}


def to_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The one mapping from an exception to (status, OpenAI error body)."""
    if isinstance(exc, SecondstageError):
        body = error_body(exc.status, exc.type, exc.message, exc.param)
        body["error"].update(exc.details)
        return exc.status, {**body, **exc.context}
    if isinstance(exc, RequestValidationError):
        return HTTPStatus.BAD_REQUEST, _validation_body(exc)
    if isinstance(exc, StarletteHTTPException):
        status = HTTPStatus(exc.status_code)
        return status, error_body(status, status.phrase.replace(" ", "") + "Error", str(exc.detail))
    # vLLM signals client mistakes it detects itself (e.g. prompt too long) with these.
    try:
        from vllm.exceptions import VLLMValidationError

        if isinstance(exc, VLLMValidationError):
            return HTTPStatus.BAD_REQUEST, error_body(
                HTTPStatus.BAD_REQUEST, "BadRequestError", str(exc), getattr(exc, "parameter", None)
            )
    except ImportError:  # unit tests without the engine installed
        pass
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    return status, error_body(status, "InternalServerError", "internal error; see the server log")


def _validation_body(exc: RequestValidationError) -> dict[str, Any]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        param = None
        message = "request body is not valid JSON; send a JSON object with Content-Type: application/json"
    else:
        # pydantic prefixes our validators' messages with "Value error, "; the client needs only ours.
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        message = f"{param or 'body'}: {msg}"
        if "input" in first and first.get("type") != "missing":
            message += f" (got {first['input']!r:.200})"
    return error_body(HTTPStatus.BAD_REQUEST, "BadRequestError", message, param)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, body = to_error(exc)
        if status >= 500:
            logger.exception("request %s %s failed", request.method, request.url.path, exc_info=exc)
        # Keep headers the error carries, e.g. `Allow` on a 405 (RFC 9110 requires it), `Retry-After` on a 429.
        headers = getattr(exc, "headers", None) if isinstance(exc, (StarletteHTTPException, SecondstageError)) else None
        return JSONResponse(body, status_code=int(status), headers=headers)

    for exc_type in (SecondstageError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
