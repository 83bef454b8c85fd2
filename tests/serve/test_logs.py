"""serve's logs: JSON lines, the request id on every line of a request, one access line per request."""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.app import build_app
from serve.engine import ModelEngine
from serve.logs import (
    ACCESS_LOGGER,
    JsonFormatter,
    RequestIdFilter,
    current_request,
    logging_config,
    vllm_logging_env,
)
from serve.settings import ServeSettings

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What serve's JSON handler writes, for the duration of a test (the handler `logging_config` builds)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_line_shape(json_lines: io.StringIO) -> None:
    logging.getLogger("secondstage.test").warning("disk %s is full", "/var", extra={"spool_mb": 12})
    [line] = _lines(json_lines)
    assert line["level"] == "warning" and line["logger"] == "secondstage.test"
    assert line["message"] == "disk /var is full" and line["spool_mb"] == 12
    assert line["time"].endswith("+00:00")
    assert "request_id" not in line  # outside a request there is none


def test_access_line_carries_request_id_version_route_status_latency(
    settings: ServeSettings, engine: ModelEngine, json_lines: io.StringIO
) -> None:
    seen_inside: list[str | None] = []

    with TestClient(build_app(settings, engine=engine)) as client:
        r = client.post(
            "/v1/chat/completions",
            json={"model": "demo", "messages": MSG, "max_tokens": 5},
            headers={"x-request-id": "req-42"},
        )
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"

        @client.app.get("/test-inner")  # type: ignore[attr-defined]
        def inner() -> dict[str, str]:
            request = current_request()
            seen_inside.append(request.request_id if request else None)
            logging.getLogger("secondstage.test").info("inside the request")
            return {}

        missing = client.get("/no-such-route")
        generated = missing.headers["x-request-id"]
        client.get("/test-inner")

    access = [line for line in _lines(json_lines) if line["logger"] == ACCESS_LOGGER]
    chat = next(line for line in access if line["path"] == "/v1/chat/completions")
    assert chat["request_id"] == "req-42"
    assert chat["route"] == "/v1/chat/completions" and chat["status"] == 200 and chat["method"] == "POST"
    assert chat["version"] == "base" and chat["latency_ms"] >= 0
    unknown = next(line for line in access if line["path"] == "/no-such-route")
    # No id sent: the one the response echoes is the one the log line carries.
    assert unknown["request_id"] == generated and unknown["status"] == 404 and unknown["route"] == "other"
    inside = next(line for line in _lines(json_lines) if line["message"] == "inside the request")
    assert inside["request_id"] == seen_inside[0] is not None


def test_streamed_request_is_logged_once_at_its_end(client: TestClient, json_lines: io.StringIO) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={"model": "demo", "messages": MSG, "max_tokens": 5, "stream": True},
        headers={"x-request-id": "stream-1"},
    )
    assert r.status_code == 200
    access = [line for line in _lines(json_lines) if line.get("request_id") == "stream-1"]
    assert [(line["logger"], line["status"], line["version"]) for line in access] == [(ACCESS_LOGGER, 200, "base")]


def test_logging_config_text_and_json() -> None:
    text = logging_config("warning", "text")
    assert "%(request_id)s" in text["formatters"]["default"]["format"]
    assert text["root"]["level"] == "WARNING"
    assert text["loggers"]["uvicorn.access"]["propagate"] is False  # ours replace uvicorn's access lines
    assert logging_config("info", "json")["formatters"]["default"]["()"] == "serve.logs.JsonFormatter"
    with pytest.raises(ValueError, match="log format: 'xml'"):
        logging_config("info", "xml")


def test_text_lines_carry_the_request_id() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(logging_config()["formatters"]["default"]["format"]))
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("secondstage.test.text")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert "[-]: outside" in out.getvalue()


def test_vllm_gets_the_same_config_as_a_file(tmp_path: Path) -> None:
    config = logging_config("info", "json")
    env = vllm_logging_env(config, tmp_path / "logging.json")
    assert env["VLLM_CONFIGURE_LOGGING"] == "1"
    loaded = json.loads(Path(env["VLLM_LOGGING_CONFIG_PATH"]).read_text())
    assert loaded == config  # plain JSON, loadable by vLLM's processes
    resolve = logging.config.BaseConfigurator({}).resolve  # what dictConfig does with "()" names
    assert resolve(loaded["formatters"]["default"]["()"]) is JsonFormatter
    assert resolve(loaded["filters"]["request"]["()"]) is RequestIdFilter
