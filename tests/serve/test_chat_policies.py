"""Policies through the chat route (fake engine): input block, streamed redaction/blocking, records, pairs."""

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

RULES = """
version: 1
rules:
  - id: in.block
    description: Refuse requests about forbidden things.
    kind: keywords
    keywords: [forbidden]
    stages: [input]
    action: block
    refusal: "I can't talk about that."
  - id: out.email
    description: Redact emails in output.
    kind: preset
    preset: email
    stages: [output]
    action: redact
  - id: out.key
    description: Stop on API keys.
    kind: preset
    preset: openai_key
    stages: [output]
    action: block
    refusal: "[response withheld]"
  - id: limits
    description: A cap larger than the context left.
    kind: limit
    max_output_tokens: 1000
  - id: out.shadow
    description: Measure the word banana.
    kind: keywords
    keywords: [banana]
    stages: [output]
    action: redact
    mode: shadow
"""

REPLIES = {
    "mail": "Write to jane.doe@example.com today.",
    "key": "Your key is sk-abcdefghijklmnopqrstuvwxyz123456 ok",
    "fruit": "I like banana bread.",
}


@pytest.fixture
def pclient(tmp_path: Path, settings: ServeSettings) -> Iterator[TestClient]:
    rules = tmp_path / "policies"
    rules.mkdir()
    (rules / "test.yaml").write_text(RULES)
    settings = settings.model_copy(update={"policies_enabled": True, "policies_dir": rules})
    llm = FakeLLM(reply=lambda prompt: next((v for k, v in REPLIES.items() if k in prompt), "fine"))
    engine = fake_engine(llm, settings)
    with TestClient(build_app(settings, engine=engine)) as c:
        c.llm = llm  # type: ignore[attr-defined]
        yield c


def _ask(c: TestClient, text: str, stream: bool) -> tuple[str, str | None, str]:
    body = {"messages": [{"role": "user", "content": text}], "stream": stream}
    if not stream:
        r = c.post("/v1/chat/completions", json=body).json()
        return r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"], r["id"]
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    text_out = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    finish = next(
        (ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"] and ch["choices"][0]["finish_reason"]),
        None,
    )
    return text_out, finish, chunks[0]["id"]


def _record(settings: ServeSettings, cid: str) -> dict:
    rc = redis.Redis.from_url(settings.redis_url)
    deadline = time.time() + 5
    while (raw := rc.get(Keys(settings.redis_prefix).completion(cid))) is None and time.time() < deadline:
        time.sleep(0.05)
    assert raw is not None
    return json.loads(raw)


@pytest.mark.parametrize("stream", [False, True])
def test_output_redaction_and_block_same_streamed_or_not(pclient: TestClient, stream: bool) -> None:
    text, finish, _ = _ask(pclient, "mail", stream)
    assert (text, finish) == ("Write to [EMAIL] today.", "stop")
    text, finish, _ = _ask(pclient, "key", stream)
    assert "sk-" not in text and text == "Your key is [response withheld]" and finish == "content_filter"
    text, finish, _ = _ask(pclient, "fruit", stream)
    assert text == "I like banana bread."  # shadow changes nothing


@pytest.mark.parametrize("stream", [False, True])
def test_input_block_skips_engine(pclient: TestClient, stream: bool) -> None:
    before = len(pclient.llm.seen)  # type: ignore[attr-defined]
    text, finish, _ = _ask(pclient, "tell me the forbidden thing", stream)
    assert (text, finish) == ("I can't talk about that.", "content_filter")
    assert len(pclient.llm.seen) == before  # type: ignore[attr-defined]


def test_decisions_and_pairs_reach_redis_and_metrics(pclient: TestClient, settings: ServeSettings) -> None:
    _, _, cid = _ask(pclient, "mail", True)
    record = _record(settings, cid)
    assert record["choices"][0]["text"] == "Write to [EMAIL] today."
    assert "raw_text" not in record["choices"][0]  # only with store_raw_output (tests/serve/test_data_at_rest.py)
    [decision] = [d for d in record["policy"]["decisions"] if d["stage"] == "output"]
    assert decision["rule_id"] == "out.email" and decision["action"] == "redact" and decision["mode"] == "enforce"
    assert record["policy"]["ruleset"]
    _, _, shadow_id = _ask(pclient, "fruit", False)
    [shadow] = [d for d in _record(settings, shadow_id)["policy"]["decisions"] if d["stage"] == "output"]
    assert shadow["mode"] == "shadow"

    rc = redis.Redis.from_url(settings.redis_url)
    pairs = [json.loads(f[b"data"]) for _, f in rc.xrange(Keys(settings.redis_prefix).policy_pairs)]
    pair = next(p for p in pairs if "Write to" in p["rejected"])
    assert pair["chosen"] == "Write to [EMAIL] today." and pair["rule_ids"] == ["out.email"]
    assert pair["rejected"] == "Write to [withheld] today."  # what the rule caught is not stored
    assert not any("banana" in p["rejected"] for p in pairs)  # shadow decisions teach nothing
    metrics = pclient.get("/metrics").text
    assert (
        'secondstage_policy_decisions_total{action="redact",mode="enforce",rule="out.email",stage="output"}' in metrics
    )


def test_output_cap_larger_than_context_fits_itself(pclient: TestClient) -> None:
    """A cap the client did not ask for shrinks to the room left in the context (it used to be a 400)."""
    r = pclient.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    r = pclient.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["param"] in ("messages", "max_tokens")


def test_admin_policies_route(pclient: TestClient, settings: ServeSettings) -> None:
    admin = {"Authorization": f"Bearer {settings.admin_key_path.read_text().strip()}"}
    assert pclient.get("/admin/policies").status_code == 401  # admin routes need the admin key, also locally
    active = pclient.get("/admin/policies", headers=admin).json()
    assert {r["id"] for r in active["rules"]} >= {"in.block", "out.email"}
    assert pclient.post("/admin/policies/reload", headers=admin).status_code == 200
