"""Per-key rate limits over a fake engine and a real redis-server: 429s, headers, isolation, fail-open."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi import Request
from fastapi.testclient import TestClient

from core.keys import Keys
from core.redis_server import PrivateRedis
from serve import deps
from serve.app import build_app
from serve.caller import Caller, KeyLimits
from serve.engine import ModelEngine
from serve.limits import duration, storage_uri
from serve.settings import ServeSettings
from tests.fakes import FakeLLM

MSG = [{"role": "user", "content": "hi"}]

# Test keys and their limits, standing in for the API-key store (tests/serve/auth/ covers the store; one test
# below goes through it end to end).
KEYS = {
    "key-rpm2": KeyLimits(rpm=2),
    "key-other": KeyLimits(rpm=100),
    "key-tpm": KeyLimits(tpm=100),
    "key-fb": KeyLimits(feedback_per_min=2),
    "key-conc1": KeyLimits(max_concurrency=1),
}


def _caller_with_limits(request: Request) -> Caller:
    key = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or None
    return Caller(api_key=key, scopes=frozenset({"chat", "feedback"}), limits=KEYS.get(key or "", KeyLimits()))


def _client(settings: ServeSettings, engine: ModelEngine) -> TestClient:
    app = build_app(settings, engine=engine)
    app.dependency_overrides[deps._caller] = _caller_with_limits
    return TestClient(app)


@pytest.fixture
def limited(settings: ServeSettings, engine: ModelEngine) -> Iterator[TestClient]:
    with _client(settings, engine) as c:
        yield c


def _chat(client: TestClient, key: str, **body: object) -> object:
    return client.post(
        "/v1/chat/completions", json={"messages": MSG, **body}, headers={"Authorization": f"Bearer {key}"}
    )


def test_rpm_429_with_openai_headers_and_other_keys_unaffected(limited: TestClient) -> None:
    first, second = _chat(limited, "key-rpm2"), _chat(limited, "key-rpm2")
    assert first.status_code == second.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert second.headers["x-ratelimit-reset-requests"].endswith("s")

    refused = _chat(limited, "key-rpm2")
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert int(refused.headers["retry-after-ms"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "limit 2" in error["message"]

    # A flood from one key does not starve another: its own window, its own headers.
    for _ in range(5):
        other = _chat(limited, "key-other")
        assert other.status_code == 200 and other.headers["x-ratelimit-limit-requests"] == "100"
    assert 'secondstage_rate_limited_total{limit="requests"} 1.0' in limited.get("/metrics").text


def test_streamed_response_carries_the_headers(limited: TestClient) -> None:
    with limited.stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": MSG, "stream": True},
        headers={"Authorization": "Bearer key-rpm2"},
    ) as r:
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "1"
        r.read()


def test_tokens_per_minute_charge_prompt_and_completion_budget(limited: TestClient) -> None:
    ok = _chat(limited, "key-tpm", max_tokens=20)
    assert ok.status_code == 200, ok.text
    charged = 100 - int(ok.headers["x-ratelimit-remaining-tokens"])
    prompt = ok.json()["usage"]["prompt_tokens"]
    assert charged == prompt + 20, "a request is charged its prompt plus its whole max_tokens budget"
    assert ok.headers["x-ratelimit-limit-tokens"] == "100"

    refused = _chat(limited, "key-tpm", max_tokens=100 - charged - prompt + 1)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert "retry-after" in refused.headers
    # Refused requests consume nothing: what is left still fits.
    fits = _chat(limited, "key-tpm", max_tokens=100 - charged - prompt)
    assert fits.status_code == 200, fits.text
    assert fits.headers["x-ratelimit-remaining-tokens"] == "0"

    whole = _chat(limited, "key-other", max_tokens=10)  # other keys have no token limit
    assert whole.status_code == 200 and "x-ratelimit-limit-tokens" not in whole.headers


def test_a_request_bigger_than_the_whole_token_limit_says_so(limited: TestClient) -> None:
    r = _chat(limited, "key-tpm", max_tokens=200)
    assert r.status_code == 429 and "lower max_tokens" in r.json()["error"]["message"]


def test_completions_route_is_limited_too(limited: TestClient) -> None:
    auth = {"Authorization": "Bearer key-rpm2"}
    statuses = [
        limited.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4}, headers=auth).status_code
        for _ in range(3)
    ]
    assert statuses == [200, 200, 429]


def test_feedback_per_minute(limited: TestClient) -> None:
    auth = {"Authorization": "Bearer key-fb"}
    cid = limited.post("/v1/chat/completions", json={"messages": MSG}, headers=auth).json()["id"]
    statuses = []
    for _ in range(3):
        r = limited.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"}, headers=auth)
        statuses.append(r.status_code)
    assert statuses == [200, 200, 429]
    assert r.json()["error"]["type"] == "feedback" and r.headers["x-ratelimit-limit-feedback"] == "2"
    # Feedback has its own window: chat requests of the key are not counted in it, nor it in theirs.
    assert limited.post("/v1/chat/completions", json={"messages": MSG}, headers=auth).status_code == 200


def test_concurrency_lease_held_for_the_whole_stream(
    limited: TestClient, fake_llm: FakeLLM, settings: ServeSettings
) -> None:
    fake_llm.delay = 0.05  # "echo: hi" takes ~0.4 s to stream
    auth = {"Authorization": "Bearer key-conc1"}
    first: dict[str, object] = {}

    def stream() -> None:
        with limited.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}, headers=auth) as r:
            first["status"] = r.status_code
            first["body"] = r.read()

    thread = threading.Thread(target=stream)
    thread.start()
    leases = f"{Keys(settings.redis_prefix).rate_limits}:inflight:{Caller(api_key='key-conc1').key_id}"
    rc = redis.Redis.from_url(settings.redis_url)
    deadline = time.time() + 5
    while not rc.zcard(leases) and time.time() < deadline:
        time.sleep(0.01)
    second = _chat(limited, "key-conc1")
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "concurrency"
    thread.join(10)
    assert first["status"] == 200 and b"[DONE]" in first["body"]  # type: ignore[operator]
    assert rc.zcard(leases) == 0, "the lease is given back when the stream ends"
    assert _chat(limited, "key-conc1").status_code == 200


def test_lease_released_when_the_request_fails(limited: TestClient, settings: ServeSettings) -> None:
    auth = {"Authorization": "Bearer key-conc1"}
    bad = limited.post("/v1/chat/completions", json={"messages": MSG, "model": "nope"}, headers=auth)
    assert bad.status_code == 404
    assert _chat(limited, "key-conc1").status_code == 200


def test_anonymous_limits_are_settings(settings: ServeSettings, engine: ModelEngine) -> None:
    settings.anonymous_rpm = 1
    with TestClient(build_app(settings, engine=engine)) as client:
        assert client.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200
        r = client.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 429 and r.headers["x-ratelimit-limit-requests"] == "1"


def test_no_limits_no_headers(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200 and not [h for h in r.headers if h.startswith("x-ratelimit")]


def test_limit_state_lives_under_the_deployment_prefix(limited: TestClient, settings: ServeSettings) -> None:
    _chat(limited, "key-rpm2")
    _chat(limited, "key-tpm", max_tokens=5)
    rc = redis.Redis.from_url(settings.redis_url)
    prefix = Keys(settings.redis_prefix).rate_limits
    names = [k.decode() for k in rc.keys("*") if b"limit" in k.lower() or b"LIMIT" in k]
    assert names and all(n.startswith(prefix + ":") for n in names), names
    assert all(rc.ttl(n) > 0 for n in names), "limit state expires by itself"


def test_redis_down_fails_open(tmp_path: Path, engine: ModelEngine) -> None:
    redis_server = PrivateRedis(tmp_path / "redis-to-stop")  # not the fixture's: this one is stopped
    redis_server.start()
    settings = ServeSettings(
        var_dir=tmp_path / "var",
        redis_url=redis_server.url,
        served_model_name="demo",
        max_model_len=512,
        policies_enabled=False,
        anonymous_rpm=1,
        anonymous_max_concurrency=1,
    )
    with TestClient(build_app(settings, engine=engine)) as client:
        redis_server.stop()
        for _ in range(3):
            r = client.post("/v1/chat/completions", json={"messages": MSG})
            assert r.status_code == 200, r.text
        metrics = client.get("/metrics").text
        assert "secondstage_rate_limit_errors_total 0.0" not in metrics
        assert "secondstage_rate_limit_errors_total" in metrics


def test_storage_uri_and_duration() -> None:
    assert storage_uri("unix:///tmp/r.sock") == "async+redis+unix:///tmp/r.sock"
    assert storage_uri("redis://h:6379/0") == "async+redis://h:6379/0"
    assert storage_uri("rediss://h") == "async+rediss://h"
    assert [duration(s) for s in (0.0123, 1, 1.5, 360, 59.9999)] == ["13ms", "1s", "1.5s", "6m0s", "1m0s"]
