"""/health, /health/ready and the restart metric with serve's own supervised redis-server (no REDIS_URL).

The real app factory over a fake engine; the private Redis is a real child that the tests SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.redis_server import PrivateRedis, supervisor_holder
from core.redis_supervisor import FAILED, RedisSupervisor
from serve.app import build_app
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

MSG = [{"role": "user", "content": "hello"}]


def wait_for(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def private_settings(tmp_path: Path) -> ServeSettings:
    return ServeSettings(
        var_dir=tmp_path / "var", redis_url=None, served_model_name="demo", max_model_len=512, policies_enabled=False
    )


@pytest.fixture
def app_client(private_settings: ServeSettings) -> Iterator[TestClient]:
    engine = fake_engine(FakeLLM(), private_settings)
    with TestClient(build_app(private_settings, engine=engine)) as c:
        yield c


def supervisor_of(c: TestClient) -> RedisSupervisor:
    s = c.app.state.redis_supervisor  # type: ignore[attr-defined]
    assert isinstance(s, RedisSupervisor)
    return s


def kill_child(s: RedisSupervisor) -> None:
    assert s.server.pid is not None
    os.kill(s.server.pid, signal.SIGKILL)


def test_serve_supervises_its_private_redis_and_says_so(
    app_client: TestClient, private_settings: ServeSettings
) -> None:
    s = supervisor_of(app_client)
    assert s.server.owned and supervisor_holder(private_settings.redis_dir) == f"pid {os.getpid()}"
    health = app_client.get("/health").json()
    assert health["status"] == "ok" and health["redis"] == "up" and health["redis_restarts"] == 0
    assert app_client.get("/health/ready").json() == {"status": "ready"}
    assert "secondstage_redis_up 1.0" in app_client.get("/metrics").text


def test_a_killed_redis_comes_back_and_the_outage_records_reach_it_without_restarting_serve(
    app_client: TestClient, private_settings: ServeSettings
) -> None:
    s = supervisor_of(app_client)
    assert app_client.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200  # warm-up
    s.min_delay_s = 2.0  # keep it down long enough to chat during the outage
    kill_child(s)
    wait_for(lambda: app_client.get("/health").json()["status"] == "degraded", what="degraded")
    health = app_client.get("/health").json()
    assert health["redis"] == "restarting" and "killed by SIGKILL" in health["reason"]
    assert app_client.get("/health/ready").status_code == 200  # a restart under way is no reason to drain
    r = app_client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200, r.text
    assert not s.up  # the record went to the spool, not to Redis
    wait_for(lambda: app_client.get("/health").json()["status"] == "ok", what="back")
    assert app_client.get("/health").json()["redis_restarts"] == 1
    keys = Keys(private_settings.redis_prefix)
    with redis.Redis.from_url(s.url) as c:
        wait_for(lambda: c.get(keys.completion(r.json()["id"])) is not None, what="the outage's record in Redis")
    assert app_client.app.state.writer.spooled_total >= 1  # type: ignore[attr-defined]
    metrics = app_client.get("/metrics").text
    assert 'secondstage_redis_restarts_total{result="ok"} 1.0' in metrics
    assert "secondstage_redis_up 1.0" in metrics


def test_a_redis_that_cannot_come_back_is_degraded_and_not_ready_while_chat_goes_on(app_client: TestClient) -> None:
    s = supervisor_of(app_client)
    with redis.Redis.from_url(s.url) as c:
        c.set("k", "v")  # something in the AOF to corrupt
    (aof,) = (s.server.data_dir / "appendonlydir").glob("*.incr.aof")
    good = aof.read_bytes()
    aof.write_bytes(good[:20] + b"GARBAGE!!" + good[20:])
    kill_child(s)
    wait_for(lambda: s.state == FAILED, what="failed")
    health = app_client.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "degraded" and body["redis"] == "failed"
    assert "Bad file format reading the append only file" in body["reason"]
    ready = app_client.get("/health/ready")
    assert ready.status_code == 503
    assert "cannot be brought back" in ready.json()["error"]["message"]
    assert app_client.post("/v1/chat/completions", json={"messages": MSG}).status_code == 200
    metrics = app_client.get("/metrics").text
    assert 'secondstage_redis_restarts_total{result="failed"}' in metrics
    assert "secondstage_redis_up 0.0" in metrics


def test_a_configured_redis_url_is_not_supervised(client: TestClient) -> None:
    assert client.app.state.redis_supervisor is None  # type: ignore[attr-defined]
    assert client.get("/health").json()["redis"] == "external"


def test_serve_shutdown_stops_its_child_and_releases_the_directory(private_settings: ServeSettings) -> None:
    engine = fake_engine(FakeLLM(), private_settings)
    with TestClient(build_app(private_settings, engine=engine)):
        pass
    assert supervisor_holder(private_settings.redis_dir) is None
    assert not PrivateRedis(private_settings.redis_dir).ping()
