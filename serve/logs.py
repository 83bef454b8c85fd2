"""serve's logging: text or JSON lines, the request id on every line a request logs, one access line per request.

`RequestLogMiddleware` (outermost in the app) gives each HTTP request a `RequestLog` in a context variable:
the request id (the client's `x-request-id`, else a new one, put into the request's headers so the
request middleware echoes that same id), the route template, the model version the engine pinned it to
(`note_version`), the status and the latency. `RequestIdFilter` copies it onto every log record made while
the request runs (a log line from the engine or a policy names its request), and the middleware writes
one access line per request on `secondstage.access` when it ends — after the last byte, so a stream's
latency is the whole stream. uvicorn's own access lines are turned off by `logging_config` (they would
repeat ours without the id, version or latency).

`logging_config(level, fmt)` is the `logging.config.dictConfig` both the root logger and uvicorn use
(`secondstage serve --log-format json`, SECONDSTAGE_LOG_FORMAT).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "secondstage.access"

access_logger = logging.getLogger(ACCESS_LOGGER)


@dataclass
class RequestLog:
    """What the log lines of one request carry; mutable, so code deeper in the request can add the version."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    route: str | None = None
    version: str | None = None
    status: int | None = None


_current: contextvars.ContextVar[RequestLog | None] = contextvars.ContextVar("secondstage_request", default=None)


def current_request() -> RequestLog | None:
    """The request being served in this context, if any."""
    return _current.get()


def note_version(version: str) -> None:
    """Record the model version serving the current request (for its log lines); no-op outside a request."""
    request = _current.get()
    if request is not None:
        request.version = version


class RequestLogMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so the context variable reaches the endpoint and its streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        given = next((v for k, v in headers if k == b"x-request-id"), b"")
        if not given:
            # Chosen here and put into the headers, so the id the response echoes (serve/middleware.py) and the
            # id the log lines carry are the same.
            given = uuid.uuid4().hex.encode("latin-1")
            scope = {**scope, "headers": [*headers, (b"x-request-id", given)]}
        request = RequestLog(given.decode("latin-1"), scope["method"], scope["path"])
        token = _current.set(request)

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                request.status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # FastAPI's matched route: its template, so ids in paths do not split it
            request.route = getattr(route, "path_format", None) or "other"
            _log_access(request, scope)
            _current.reset(token)


def _log_access(request: RequestLog, scope: Scope) -> None:
    status = request.status if request.status is not None else 500
    latency_ms = (time.perf_counter() - request.started) * 1000
    client = scope.get("client")
    access_logger.info(
        '%s "%s %s" %d %.1fms',
        f"{client[0]}:{client[1]}" if client else "-",
        request.method,
        request.path,
        status,
        latency_ms,
        extra={
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": request.method,
            "path": request.path,
            "route": request.route,
            "status": status,
            "latency_ms": round(latency_ms, 1),
            "version": request.version,
        },
    )


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (and version) on every record; `-` outside a request, for text formats."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = _current.get()
        if not hasattr(record, "request_id"):
            record.request_id = request.request_id if request else "-"
        if request is not None and getattr(record, "version", None) is None:
            record.version = request.version
        return True


# Fields of a LogRecord itself; anything else on a record came from `extra=` (or the filter) and is data.
# color_message: uvicorn's copy of the message with terminal colours.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the request's fields, any `extra=` values.

    A small Formatter rather than python-json-logger: it is not a dependency of the project, and these
    fifteen lines are all that is needed.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and value is not None and value != "-":
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def logging_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """A dictConfig for the root logger and uvicorn's loggers: one stderr handler, text or JSON, request ids on."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format: {fmt!r} is not one of text, json")
    # Classes by name, so the config is plain JSON: vLLM's processes load it too (`vllm_logging_env`).
    formatter: dict[str, Any] = {"()": f"{__name__}.JsonFormatter"} if fmt == "json" else {"format": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request"],
            }
        },
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            # uvicorn's loggers propagate to the root's handler (one format for everything) ...
            "uvicorn": {"handlers": [], "level": level.upper(), "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level.upper(), "propagate": True},
            # ... except its access lines: ours (secondstage.access) carry the id, version and latency.
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def vllm_logging_env(config: dict[str, Any], path: Path) -> dict[str, str]:
    """Environment that makes vLLM log through `config` (written to `path`) in every process it starts.

    vLLM installs its own handler and format on its loggers, in the server and in its engine-core processes,
    which our dictConfig never reaches; VLLM_LOGGING_CONFIG_PATH is its documented way to replace them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return {"VLLM_CONFIGURE_LOGGING": "1", "VLLM_LOGGING_CONFIG_PATH": str(path)}
