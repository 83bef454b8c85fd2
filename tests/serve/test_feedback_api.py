"""POST /v1/feedback: validation against the completion, and the record in Redis."""

from __future__ import annotations

import json
import time

import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.settings import ServeSettings

MSG = [{"role": "user", "content": "hi"}]


def _feedback_entries(settings: ServeSettings) -> list[dict]:
    rc = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    deadline = time.time() + 5
    while time.time() < deadline:
        entries = rc.xrange(keys.feedback)
        if entries:
            return [json.loads(f[b"data"]) for _, f in entries]
        time.sleep(0.05)
    return []


def test_feedback_recorded_and_linked(client: TestClient, settings: ServeSettings) -> None:
    cid = client.post("/v1/chat/completions", json={"messages": MSG, "n": 2}).json()["id"]
    r = client.post(
        "/v1/feedback",
        json={"completion_id": cid, "thumbs": "down", "rating": 2, "correction": "Hello!", "preferred_choice": 1},
    )
    assert r.status_code == 200, r.text
    assert r.json()["id"].startswith("fb-") and r.json()["completion_id"] == cid
    [entry] = _feedback_entries(settings)
    assert entry["completion_id"] == cid and entry["correction"] == "Hello!" and entry["preferred_choice"] == 1
    assert entry["schema"] == 1 and entry["kind"] == "feedback"
    metrics = client.get("/metrics").text
    assert 'secondstage_feedback_total{kind="thumbs_down",version="base"} 1.0' in metrics
    assert 'secondstage_feedback_total{kind="correction",version="base"} 1.0' in metrics


def test_feedback_errors(client: TestClient) -> None:
    cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    r = client.post("/v1/feedback", json={"completion_id": "chatcmpl-nope", "thumbs": "up"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id"
    cases = [
        ({"completion_id": cid, "rating": 9}, "rating"),
        ({"completion_id": cid, "thumbs": "sideways"}, "thumbs"),
        ({"completion_id": cid}, None),
        ({"completion_id": cid, "thumbs": "up", "choice_index": 3}, "choice_index"),
        ({"completion_id": cid, "preferred_choice": 0}, "preferred_choice"),
        ({"completion_id": cid, "thumbs": "up", "surprise": 1}, "surprise"),
    ]
    for body, param in cases:
        r = client.post("/v1/feedback", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.json())


def test_feedback_on_completion_from_before_restart(client: TestClient, settings: ServeSettings, engine) -> None:  # type: ignore[no-untyped-def]
    """A completion known only to Redis (not this process's memory) is found there."""
    cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    rc = redis.Redis.from_url(settings.redis_url)
    deadline = time.time() + 5
    while rc.get(Keys(settings.redis_prefix).completion(cid)) is None and time.time() < deadline:
        time.sleep(0.05)
    client.app.state.feedback.recorder._recent.clear()  # type: ignore[attr-defined]
    assert client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"}).status_code == 200
