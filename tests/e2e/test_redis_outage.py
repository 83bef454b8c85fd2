"""Kill Redis under a serving server: no chat fails, and after Redis returns no record is lost."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from core.keys import Keys
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow


def _chat(url: str, i: int) -> str:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": f"What is {i % 10} plus 1?"}],
            "max_tokens": 16,
            "user": "outage",
        },
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_redis_outage_loses_nothing(server: Server) -> None:
    keys = Keys("secondstage")
    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(lambda i: _chat(server.url, i), range(8)))
        server.redis.kill()  # SIGKILL mid-traffic
        during = list(pool.map(lambda i: _chat(server.url, i), range(24)))
        fb = httpx.post(server.url + "/v1/feedback", json={"completion_id": during[0], "thumbs": "up"}, timeout=10)
        assert fb.status_code == 200, fb.text
        server.redis.restart()
        after = list(pool.map(lambda i: _chat(server.url, i), range(8)))

    ids = set(warm + during + after)
    client = redis.Redis.from_url(server.redis.url)
    deadline = time.time() + 60
    missing = ids
    while time.time() < deadline:
        missing = {cid for cid in ids if client.get(keys.completion(cid)) is None}
        if not missing:
            break
        time.sleep(0.5)
    assert not missing, f"{len(missing)} completion records lost"
    streamed = {f[b"id"].decode() for _, f in client.xrange(keys.completions)}
    assert ids <= streamed
    feedback = [json.loads(f[b"data"]) for _, f in client.xrange(keys.feedback)]
    assert any(f["completion_id"] == during[0] for f in feedback)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert "secondstage_log_records_spooled_total" in metrics
