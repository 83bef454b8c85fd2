"""Domain errors and the one table that maps exceptions to OpenAI-shaped HTTP errors.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with
`code` the HTTP status (vLLM's server does the same). Domain errors carry their
status; anything unknown is a 500 — a bare ValueError is our bug, not the client's.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("secondstage.errors")


class SecondstageError(Exception):
    """Root of the errors a client can be told about."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    type: str = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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


class Unavailable(SecondstageError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    type = "ServiceUnavailableError"


def error_body(status: HTTPStatus | int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": int(status)}}


def to_error(exc: BaseException) -> tuple[HTTPStatus, dict[str, Any]]:
    """The one mapping from an exception to (status, OpenAI error body)."""
    if isinstance(exc, SecondstageError):
        return exc.status, error_body(exc.status, exc.type, exc.message, exc.param)
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
        # Keep headers the HTTP error carries, e.g. `Allow` on a 405 (RFC 9110 requires it).
        headers = getattr(exc, "headers", None) if isinstance(exc, StarletteHTTPException) else None
        return JSONResponse(body, status_code=int(status), headers=headers)

    for exc_type in (SecondstageError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
