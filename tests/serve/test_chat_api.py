"""The chat route over a fake engine: response shapes, streaming, errors, records."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.errors import ClientClosed, to_error
from serve.routers.chat import until_disconnect
from serve.settings import ServeSettings

MSG = [{"role": "user", "content": "hello"}]


def _sse(text: str) -> list[dict | str]:
    out: list[dict | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_chat_completion_shape(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "demo", "messages": MSG, "max_tokens": 50})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"] == "base"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello", "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len("echo: hello")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.headers["x-request-id"]


def test_n_and_length(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "n": 3, "max_completion_tokens": 4})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" and c["message"]["content"] == "echo" for c in body["choices"])


def test_stream_with_usage(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": MSG, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        assert r.status_code == 200
        events = _sse(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: hello"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len("echo: hello")
    assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == "base" for c in chunks)


def test_logprobs(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "logprobs": True, "top_logprobs": 2})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == len("echo: hello")
    assert content[0]["token"] == "e" and len(content[0]["top_logprobs"]) == 2


def test_bad_input_is_400_naming_param(client: TestClient) -> None:
    cases = [
        ({"messages": MSG, "temperature": -1}, "temperature"),
        ({"messages": MSG, "n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": MSG, "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": MSG, "max_tokens": 10_000}, "messages"),
    ]
    for body, param in cases:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param, (body, err)
        assert err["type"] == "BadRequestError" and err["code"] == 400


def test_unknown_model_404_and_non_json_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MSG})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_body_limit_413(client: TestClient) -> None:
    big = "x" * 1_100_000
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": big}]})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == 413 and r.json()["error"]["type"] == "RequestEntityTooLargeError"
    assert "SECONDSTAGE_MAX_BODY_BYTES" in r.json()["error"]["message"]


class _GoneRequest:
    async def is_disconnected(self) -> bool:
        return True


async def test_client_closed_is_499_through_the_error_table() -> None:
    slow = asyncio.ensure_future(asyncio.sleep(10))
    with pytest.raises(ClientClosed) as info:
        await until_disconnect(_GoneRequest(), slow)  # type: ignore[arg-type]
    status, body = to_error(info.value)
    assert status == 499 and body["error"] == {
        "message": "client disconnected",
        "type": "ClientClosedRequest",
        "param": None,
        "code": 499,
    }
    await asyncio.sleep(0)
    assert slow.cancelled()


def test_models_health_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "demo" and models["data"][0]["version"] == "base"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json={"messages": MSG})
    text = client.get("/metrics").text
    assert 'secondstage_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "secondstage_time_to_first_token_seconds_bucket" in text
    assert 'secondstage_active_version_info{model_name="demo",version="base"} 1.0' in text


def test_completion_recorded_in_redis(client: TestClient, settings: ServeSettings) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG, "user": "u1", "metadata": {"k": "v"}})
    cid = r.json()["id"]
    rc = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    deadline = time.time() + 5
    while rc.get(keys.completion(cid)) is None and time.time() < deadline:
        time.sleep(0.05)
    record = json.loads(rc.get(keys.completion(cid)))
    assert record["schema"] == 1 and record["version"] == "base" and record["user"] == "u1"
    assert record["messages"] == MSG and record["choices"][0]["text"] == "echo: hello"
    assert record["usage"]["completion_tokens"] == 11 and record["latency_s"] > 0
    entries = rc.xrange(keys.completions)
    assert any(fields[b"id"].decode() == cid and fields[b"schema"] == b"1" for _, fields in entries)
