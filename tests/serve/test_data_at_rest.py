"""Data at rest through the real app (fake engine, real Redis): what policies catch never reaches Redis in clear,
`raw_text` only with `store_raw_output`, and every record carries its retention (stream MAXLEN, key TTL)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from serve.app import build_app
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

SECRET = "sk-abcdefghijklmnopqrstuvwxyz123456"
RULES = """
version: 1
rules:
  - id: in.size
    description: Refuse long inputs.
    kind: limit
    max_input_chars: 200
  - id: in.keys
    description: Redact API keys in input.
    kind: preset
    preset: openai_key
    stages: [input]
    action: redact
  - id: in.block
    description: Refuse forbidden things.
    kind: keywords
    keywords: [forbidden]
    stages: [input]
    action: block
  - id: out.email
    description: Redact emails in output.
    kind: preset
    preset: email
    stages: [output]
    action: redact
"""
REPLY = "Write to jane.doe@example.com today."


def _app(tmp_path: Path, settings: ServeSettings, **update: object) -> TestClient:
    rules = tmp_path / "policies"
    rules.mkdir(exist_ok=True)
    (rules / "test.yaml").write_text(RULES)
    settings = settings.model_copy(update={"policies_enabled": True, "policies_dir": rules, **update})
    return TestClient(build_app(settings, engine=fake_engine(FakeLLM(reply=lambda _prompt: REPLY), settings)))


@pytest.fixture
def pclient(tmp_path: Path, settings: ServeSettings) -> Iterator[TestClient]:
    with _app(tmp_path, settings) as c:
        yield c


def _chat(c: TestClient, content: str) -> str:
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _stored(settings: ServeSettings, cid: str) -> dict:
    rc = redis.Redis.from_url(settings.redis_url or "")
    deadline = time.time() + 5
    while (raw := rc.get(Keys(settings.redis_prefix).completion(cid))) is None and time.time() < deadline:
        time.sleep(0.05)
    assert raw is not None, f"completion {cid} never reached Redis"
    return dict(json.loads(raw))


def _everything(settings: ServeSettings) -> bytes:
    """Every value of every key in Redis, streams included, as one blob to search."""
    rc = redis.Redis.from_url(settings.redis_url or "")
    out = []
    for name in rc.scan_iter():
        kind = rc.type(name)
        if kind == b"stream":
            out += [v for _, f in rc.xrange(name) for v in f.values()]
        elif kind == b"string":
            out.append(rc.get(name) or b"")
    return b"\n".join(out)


@pytest.mark.parametrize(
    ("content", "rule"),
    [
        # A size limit fires before any redaction ran: the whole input is withheld.
        (f"my key is {SECRET} " + "x" * 300, "in.size"),
        # A keyword block in the same message as a secret a later rule would have redacted.
        (f"forbidden: {SECRET}", "in.block"),
    ],
)
def test_a_blocked_input_with_a_secret_never_reaches_redis_in_clear(
    pclient: TestClient, settings: ServeSettings, content: str, rule: str
) -> None:
    cid = _chat(pclient, content)
    record = _stored(settings, cid)
    assert record["messages"] == [{"role": "user", "content": f"[withheld: input blocked by rule {rule}]"}]
    assert any(d["rule_id"] == rule and d["action"] == "block" for d in record["policy"]["decisions"])
    assert SECRET.encode() not in _everything(settings)


def test_a_redacted_input_is_stored_redacted(pclient: TestClient, settings: ServeSettings) -> None:
    cid = _chat(pclient, f"my key is {SECRET}")
    assert SECRET not in json.dumps(_stored(settings, cid)["messages"])
    assert SECRET.encode() not in _everything(settings)


def test_raw_text_and_the_caught_span_are_not_stored_by_default(pclient: TestClient, settings: ServeSettings) -> None:
    cid = _chat(pclient, "hello")
    record = _stored(settings, cid)
    assert record["choices"][0]["text"] == "Write to [EMAIL] today."
    assert "raw_text" not in record["choices"][0]
    rc = redis.Redis.from_url(settings.redis_url or "")
    deadline = time.time() + 5
    while not (pairs := rc.xrange(Keys(settings.redis_prefix).policy_pairs)) and time.time() < deadline:
        time.sleep(0.05)
    [pair] = [json.loads(f[b"data"]) for _, f in pairs]
    assert (pair["chosen"], pair["rejected"]) == ("Write to [EMAIL] today.", "Write to [withheld] today.")
    assert b"jane.doe@example.com" not in _everything(settings)


def test_raw_text_is_stored_when_the_operator_turns_it_on(tmp_path: Path, settings: ServeSettings) -> None:
    with _app(tmp_path, settings, store_raw_output=True) as c:
        cid = _chat(c, "hello")
    assert _stored(settings, cid)["choices"][0]["raw_text"] == REPLY
    rc = redis.Redis.from_url(settings.redis_url or "")
    [pair] = [json.loads(f[b"data"]) for _, f in rc.xrange(Keys(settings.redis_prefix).policy_pairs)]
    assert pair["rejected"] == REPLY


def test_records_carry_retention_stream_maxlen_and_key_ttl(tmp_path: Path, settings: ServeSettings) -> None:
    # A tiny cap: approximate trimming (`~`) frees whole radix-tree nodes (100 entries by default),
    # so the stream stays within one node of the cap, never grows with the traffic.
    with _app(tmp_path, settings, stream_maxlen=5, retention_days=1.0) as c:
        ids = [_chat(c, f"hello {i}") for i in range(250)]
    rc = redis.Redis.from_url(settings.redis_url or "")
    keys = Keys(settings.redis_prefix)
    _stored(settings, ids[-1])
    assert rc.xlen(keys.completions) <= 5 + 100
    assert rc.xlen(keys.policy_pairs) <= 5 + 100
    ttl = rc.ttl(keys.completion(ids[-1]))
    assert 86400 - 60 < ttl <= 86400
