"""The canary on one replica over a fake engine and a real Redis: sticky routing, signals, the judge, promotion.

The decision rule itself is tested in tests/core/test_canary.py; tests/e2e/test_canary.py runs it on real vLLM
with two replicas.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.canary import Rollout, Signals, assign, routing_identity
from core.keys import Keys
from core.versions import BASE, Manifest, Registry, VersionStore
from serve.app import build_app
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

USERS = [f"user-{i}" for i in range(40)]


@pytest.fixture
def canary_settings(settings: ServeSettings) -> ServeSettings:
    return settings.model_copy(
        update={
            "canary_min_requests": 10,
            "canary_min_duration_s": 0.0,
            "canary_eval_interval_s": 0.2,
            "canary_max_ttft_ratio": 1e9,  # the fake engine's timings say nothing (its first request imports vLLM)
        }
    )


def _versions(settings: ServeSettings, tmp_path: Path, *names: str) -> Rollout:
    store = VersionStore(settings.versions_dir)
    client = redis.Redis.from_url(settings.redis_url or "")
    keys = Keys(settings.redis_prefix)
    for name in names:
        adapter = tmp_path / f"adapter-{name}"
        adapter.mkdir()
        store.write(Manifest(version=name, base_model="demo"), adapter)
        Registry(client, keys).register(store.manifest(name))
    return Rollout(client, keys)


def _ask(client: TestClient, user: str, stream: bool = False) -> tuple[str, str]:
    body = {"messages": [{"role": "user", "content": "hi"}], "user": user, "max_tokens": 12}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["id"], r.json()["system_fingerprint"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        import json

        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    fingerprints = {c["system_fingerprint"] for c in chunks}
    assert len(fingerprints) == 1, fingerprints  # a stream never mixes versions
    return chunks[0]["id"], fingerprints.pop()


def _wait(what: str, check, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sticky_routing_signals_and_rollback(canary_settings: ServeSettings, tmp_path: Path) -> None:
    rollout = _versions(canary_settings, tmp_path, "v1")
    engine = fake_engine(FakeLLM(), canary_settings)
    with TestClient(build_app(canary_settings, engine=engine)) as client:
        run = rollout.start("v1", 0.5)["run"]
        _wait("the canary to be loaded", lambda: engine.canary is not None)
        expected = {u: "v1" if assign(run, 0.5, routing_identity(None, u)) else BASE for u in USERS}
        assert 10 < sum(v == "v1" for v in expected.values()) < 30
        metrics = client.get("/metrics").text
        assert (
            "secondstage_canary_share 0.5" in metrics
            and 'secondstage_canary_info{model_name="demo",version="v1"}' in metrics
        )

        # The same caller always gets the same version, streamed or not, until the judge decides; users of the
        # canary dislike it.
        decided: set[str] = set()
        for round_ in range(2):
            for user in USERS:
                cid, fingerprint = _ask(client, user, stream=bool(round_))
                if fingerprint != expected[user] or user in decided:
                    # Only after the rollback, and then for good: the incumbent.
                    assert fingerprint == BASE and rollout.state() is None, user
                    decided.add(user)
                thumbs = "down" if fingerprint == "v1" else "up"
                assert client.post("/v1/feedback", json={"completion_id": cid, "thumbs": thumbs}).status_code == 200

        # The judge rolls it back; everyone gets the incumbent again.
        _wait("the rollback", lambda: rollout.state() is None)
        assert [e["type"] for e in rollout.history("v1")] == ["canary_started", "rolled_back"]
        decision = rollout.history("v1")[-1]
        assert decision["trigger"] == "auto" and "negative_feedback_rate" in decision["reason"]
        signals = rollout.signals(run)
        # Counted while the run lasted (the last answer's feedback may have come after the decision).
        assert signals["canary"].requests >= 10 and signals["incumbent"].requests >= 10
        assert signals["canary"].negative >= signals["canary"].requests - 1 and signals["canary"].thumbs_up == 0
        assert signals["incumbent"].negative == 0 and signals["incumbent"].thumbs_up >= 10
        _wait("the replica to follow", lambda: engine.canary is None)
        assert {_ask(client, u)[1] for u in USERS[:10]} == {BASE}
        _wait(
            "the decision in /metrics",
            lambda: (
                'secondstage_canary_decisions_total{decision="rollback",trigger="auto"} 1.0'
                in client.get("/metrics").text
            ),
        )
        assert "secondstage_canary_share 0.0" in client.get("/metrics").text


def test_a_liked_canary_is_promoted_and_serves_everyone(canary_settings: ServeSettings, tmp_path: Path) -> None:
    rollout = _versions(canary_settings, tmp_path, "v1", "v2")
    Registry(rollout.client, rollout.keys).activate("v1")
    engine = fake_engine(FakeLLM(), canary_settings)
    with TestClient(build_app(canary_settings, engine=engine)) as client:
        _wait("v1 to be served", lambda: engine.current.name == "v1")
        run = rollout.start("v2", 0.5)["run"]
        _wait("the canary to be loaded", lambda: engine.canary is not None)
        assert sorted(engine.loaded_versions()) == ["v1", "v2"]  # both resident while it runs
        for user in USERS:
            cid, fingerprint = _ask(client, user)
            if fingerprint != ("v2" if assign(run, 0.5, routing_identity(None, user)) else "v1"):
                assert fingerprint == "v2" and rollout.state() is None  # only once promoted
            client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up", "rating": 5})
        _wait("the promotion", lambda: rollout.state() is None)
        assert Registry(rollout.client, rollout.keys).active() == "v2"
        _wait("the replica to follow", lambda: engine.current.name == "v2" and engine.canary is None)
        assert {_ask(client, u)[1] for u in USERS[:10]} == {"v2"}
        _wait("v1 to be unloaded", lambda: engine.loaded_versions() == ["v2"])


def test_no_decision_before_the_minimum(canary_settings: ServeSettings, tmp_path: Path) -> None:
    rollout = _versions(canary_settings, tmp_path, "v1")
    settings = canary_settings.model_copy(update={"canary_min_requests": 1000})
    engine = fake_engine(FakeLLM(), settings)
    with TestClient(build_app(settings, engine=engine)) as client:
        run = rollout.start("v1", 0.5)["run"]
        _wait("the canary to be loaded", lambda: engine.canary is not None)
        for user in USERS:
            cid, fingerprint = _ask(client, user)
            client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "down" if fingerprint == "v1" else "up"})
        judge = client.app.state.canary_judge  # type: ignore[attr-defined]
        _wait("the judge's look", lambda: judge.last is not None and Signals.parse(
            rollout.client.hgetall(rollout.keys.canary_signals(run)))["canary"].negative > 0)  # fmt: skip
        time.sleep(0.5)  # a few more judge ticks
        assert judge.last.decision == "wait" and "of 1000 requests" in judge.last.reason
        assert rollout.state() is not None


def test_a_canary_that_cannot_load_leaves_everyone_on_the_incumbent(
    canary_settings: ServeSettings, tmp_path: Path
) -> None:
    rollout = _versions(canary_settings, tmp_path, "v1")
    llm = FakeLLM(fail_lora=True)
    engine = fake_engine(llm, canary_settings)
    with TestClient(build_app(canary_settings, engine=engine)) as client:
        rollout.start("v1", 0.5)
        _wait("the failed load", lambda: 'secondstage_swaps_total{result="error"}' in client.get("/metrics").text)
        assert {_ask(client, u)[1] for u in USERS} == {BASE}
        health = client.get("/health").json()
        assert health["status"] == "degraded" and health["skew"] is True and "canary" not in health
        assert "canary v1 is not routed to here" in health["reason"]
        llm.fail_lora = False  # repaired: the backoff retries it
        _wait("the canary to load", lambda: client.get("/health").json().get("canary", {}).get("version") == "v1")
        assert client.get("/health").json()["skew"] is False
