"""POST /v1/feedback with policies on: a correction is stored as the rules leave it, or refused by a block rule.

The real app over the fake engine and a real redis-server, with the repository's own rule files (policies/) plus
one block rule: the correction that reaches the feedback stream holds no secret and no e-mail address.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.redis_server import PrivateRedis
from serve.app import build_app
from serve.engine import ModelEngine
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

POLICIES = Path(__file__).resolve().parents[2] / "policies"
BLOCK_RULE = """
version: 1
rules:
  - id: test.codename
    description: A project name that may never be taught to the model.
    kind: keywords
    keywords: [project nightjar]
    stages: [output]
    action: block
"""
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
EMAIL = "jane.doe@example.com"
MSG = [{"role": "user", "content": "How do I configure the client?"}]


@pytest.fixture
def settings(tmp_path: Path, redis_server: PrivateRedis) -> ServeSettings:
    rules = tmp_path / "policies"
    shutil.copytree(POLICIES, rules)
    (rules / "zz-test.yaml").write_text(BLOCK_RULE)
    return ServeSettings(
        var_dir=tmp_path / "var",
        redis_url=redis_server.url,
        served_model_name="demo",
        max_model_len=512,
        policies_enabled=True,
        policies_dir=rules,
    )


@pytest.fixture
def engine(settings: ServeSettings) -> ModelEngine:
    return fake_engine(FakeLLM(), settings)


@pytest.fixture
def client(settings: ServeSettings, engine: ModelEngine) -> Iterator[TestClient]:
    with TestClient(build_app(settings, engine=engine)) as c:
        yield c


def _feedback_entries(settings: ServeSettings, want: int) -> list[dict]:
    rc = redis.Redis.from_url(settings.redis_url or "")
    keys = Keys(settings.redis_prefix)
    deadline = time.time() + 5
    entries: list = []
    while time.time() < deadline:  # the log writer delivers off the request path
        entries = rc.xrange(keys.feedback)
        if len(entries) >= want:
            break
        time.sleep(0.05)
    rc.close()
    return [json.loads(f[b"data"]) for _, f in entries]


def test_a_correction_is_stored_redacted_with_the_decisions(client: TestClient, settings: ServeSettings) -> None:
    cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    correction = f"Set aws_access_key_id = {AWS_KEY} and mail {EMAIL} if it fails."
    r = client.post("/v1/feedback", json={"completion_id": cid, "thumbs": "down", "correction": correction})
    assert r.status_code == 200, r.text
    [entry] = _feedback_entries(settings, 1)
    assert entry["correction"] == "Set aws_access_key_id = [SECRET] and mail [EMAIL] if it fails."
    raw = json.dumps(entry)
    assert AWS_KEY not in raw and EMAIL not in raw  # not in clear anywhere in the record
    trace = entry["policy"]
    assert trace["ruleset"] and {d["rule_id"] for d in trace["decisions"]} == {"secrets.aws-access-key", "pii.email"}
    assert {d["action"] for d in trace["decisions"]} == {"redact"}


def test_a_clean_correction_is_stored_as_sent(client: TestClient, settings: ServeSettings) -> None:
    cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    r = client.post("/v1/feedback", json={"completion_id": cid, "correction": "Use the settings file."})
    assert r.status_code == 200, r.text
    [entry] = _feedback_entries(settings, 1)
    assert entry["correction"] == "Use the settings file."
    assert entry["policy"]["decisions"] == [] and entry["policy"]["ruleset"]


def test_a_correction_a_block_rule_stops_is_refused_and_nothing_is_stored(
    client: TestClient, settings: ServeSettings
) -> None:
    cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    body = {"completion_id": cid, "thumbs": "down", "correction": "It is part of Project Nightjar, see the wiki."}
    r = client.post("/v1/feedback", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "correction" and error["type"] == "BadRequestError"
    assert "test.codename" in error["message"] and "Nightjar" not in error["message"]
    # The same feedback without the blocked content goes through; only it reaches the stream.
    assert client.post("/v1/feedback", json={**body, "correction": "See the wiki."}).status_code == 200
    [entry] = _feedback_entries(settings, 1)
    assert entry["correction"] == "See the wiki."
    assert "Nightjar" not in json.dumps(_feedback_entries(settings, 2))


def test_without_policies_a_correction_is_stored_as_sent(tmp_path: Path, redis_server: PrivateRedis) -> None:
    settings = ServeSettings(
        var_dir=tmp_path / "var", redis_url=redis_server.url, served_model_name="demo", policies_enabled=False
    )
    with TestClient(build_app(settings, engine=fake_engine(FakeLLM(), settings))) as client:
        cid = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
        assert client.post("/v1/feedback", json={"completion_id": cid, "correction": EMAIL}).status_code == 200
    [entry] = _feedback_entries(settings, 1)
    assert entry["correction"] == EMAIL and entry["policy"] is None  # align still checks it (tests/align)
