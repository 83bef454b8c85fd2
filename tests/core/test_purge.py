"""`secondstage data purge`: records written by the real app (fake engine) under two API keys, a version trained on
one key's feedback, then the purge through the CLI against the real redis-server."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from core.cli import app as cli
from core.keys import Keys
from core.records import ChoiceRecord, CompletionRecord, Manifest, Message, Usage, encode
from core.redis_server import PrivateRedis
from core.versions import Registry, VersionStore
from serve.app import build_app
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine
from tests.serve.auth.conftest import run_store

RULES = """
version: 1
rules:
  - id: out.email
    description: Redact emails in output.
    kind: preset
    preset: email
    stages: [output]
    action: redact
"""


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@pytest.fixture
def settings(tmp_path: Path, redis_server: PrivateRedis) -> ServeSettings:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "r.yaml").write_text(RULES)
    return ServeSettings(
        var_dir=tmp_path / "var",
        redis_url=redis_server.url,
        redis_prefix="p",
        served_model_name="demo",
        max_model_len=512,
        policies_dir=tmp_path / "policies",
    )


def _serve(settings: ServeSettings) -> dict[str, list[str]]:
    """Two completions (and feedback on each) per key; returns completion ids per key."""
    for secret in ("A", "B"):  # real keys in the store, with these (short) secrets
        run_store(settings, "add", secret, f"user-{secret}", ["chat", "feedback"])
    engine = fake_engine(FakeLLM(reply=lambda _p: "Mail me at a@example.com."), settings)
    ids: dict[str, list[str]] = {"A": [], "B": []}
    with TestClient(build_app(settings, engine=engine)) as c:
        for key in ("A", "B"):
            auth = {"Authorization": f"Bearer {key}"}
            for i in range(2):
                body = {"messages": [{"role": "user", "content": f"hi {key}{i}"}], "user": f"user-{key}"}
                cid = c.post("/v1/chat/completions", json=body, headers=auth).json()["id"]
                ids[key].append(cid)
                r = c.post("/v1/feedback", json={"completion_id": cid, "thumbs": "up"}, headers=auth)
                assert r.status_code == 200, r.text
    return ids


def _wait_written(rc: redis.Redis, keys: Keys, n: int) -> None:
    deadline = time.time() + 5
    while rc.xlen(keys.feedback) < n and time.time() < deadline:
        time.sleep(0.05)


def test_purge_removes_every_record_of_a_key_and_names_the_versions(
    settings: ServeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _serve(settings)
    rc = redis.Redis.from_url(settings.redis_url or "")
    keys = Keys("p")
    _wait_written(rc, keys, 4)
    feedback = {json.loads(f[b"data"])["completion_id"]: f[b"id"].decode() for _, f in rc.xrange(keys.feedback)}
    a_feedback = sorted(feedback[c] for c in ids["A"])
    # A completion whose stream entry MAXLEN already trimmed: only its lookup key is left.
    trimmed = CompletionRecord(
        id="chatcmpl-trimmed", created=time.time(), model="demo", version="base", status="ok",
        messages=[Message(role="user", content="old")], choices=[ChoiceRecord(index=0, text="x", finish_reason="stop",
        completion_tokens=1)], usage=Usage(), latency_s=0.1, key=key_id("A"),
    )  # fmt: skip
    rc.set(keys.completion(trimmed.id), encode(trimmed))
    # v1 trained on one of A's feedback (registered in Redis); v2 on B's only (on disk only).
    Registry(rc, keys).register(Manifest(version="v1", base_model="demo", feedback_ids=[a_feedback[0], "fb-other"]))
    store = VersionStore(settings.versions_dir)
    (store.path("v2")).mkdir(parents=True)
    (store.path("v2") / "manifest.json").write_bytes(
        encode(Manifest(version="v2", base_model="demo", feedback_ids=[feedback[ids["B"][0]]]))
    )
    for name, value in (("REDIS_URL", settings.redis_url), ("VAR_DIR", str(settings.var_dir)), ("REDIS_PREFIX", "p")):
        monkeypatch.setenv(f"SECONDSTAGE_{name}", value or "")
    runner = CliRunner()

    dry = runner.invoke(cli, ["data", "purge", "--key", key_id("A"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would delete 3 completions, 2 feedback" in dry.output and "v1:" in dry.output
    assert rc.xlen(keys.completions) == 4  # nothing deleted

    done = runner.invoke(cli, ["data", "purge", "--key", key_id("A")])
    assert done.exit_code == 0, done.output
    assert "deleted 3 completions, 2 feedback" in done.output
    assert f"v1: {a_feedback[0]}" in done.output and "v2" not in done.output

    # Nothing of A's is left, anywhere; B's records are untouched.
    blob = b"".join(v for s in (keys.completions, keys.feedback, keys.policy_pairs) for _, f in rc.xrange(s)
                    for v in f.values())  # fmt: skip
    for cid in [*ids["A"], trimmed.id]:
        assert rc.get(keys.completion(cid)) is None and cid.encode() not in blob
    assert key_id("A").encode() not in blob and b"hi A" not in blob
    assert all(rc.get(keys.completion(cid)) is not None for cid in ids["B"])
    assert rc.xlen(keys.completions) == 2 and rc.xlen(keys.feedback) == 2

    by_user = runner.invoke(cli, ["data", "purge", "--user", "user-B"])
    assert by_user.exit_code == 0 and "deleted 2 completions, 2 feedback" in by_user.output
    assert "v2:" in by_user.output
    assert rc.xlen(keys.completions) == 0 and rc.xlen(keys.feedback) == 0 and rc.xlen(keys.policy_pairs) == 0


def test_purge_needs_exactly_one_identity() -> None:
    result = CliRunner().invoke(cli, ["data", "purge"])
    assert result.exit_code == 2 and "exactly one" in result.output
