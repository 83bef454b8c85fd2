"""Policies on the real server: a rule added while it runs takes effect without restart, a bad edit
is refused while the last good set stays, and a redacted real completion becomes a preference pair
in Redis that the align job reads."""

from __future__ import annotations

import hashlib
import json
import re
import time

import httpx
import pytest
import redis

from core.keys import Keys
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

# Scoped to one API key (the local admin key, which may also chat while the server runs open) so the
# other tests sharing this server see the shipped rules only. Scopes match the authenticated key, never
# the body's `user` (docs/policies.md).
RULE = """
version: 1
rules:
  - id: live.colour
    description: Redact one word of the model's own answer (test rule).
    kind: keywords
    keywords: [{word}]
    stages: [output]
    action: redact
    tag: "[COLOUR]"
    scope:
      api_keys: ["{key_id}"]
"""
BROKEN = """
version: 1
rules:
  - id: live.broken
    description: An open-ended regex without max_len.
    kind: regex
    pattern: 'a+'
    action: redact
"""


def _admin(server: Server) -> dict[str, str]:
    """The admin key serve generated into its var/ (docs/security.md)."""
    return {"Authorization": f"Bearer {(server.var_dir / 'admin.key').read_text().strip()}"}


def _reload(server: Server) -> httpx.Response:
    """POST /admin/policies/reload; a 409 means the file watcher's reload of the same edit is running: retry."""
    deadline = time.monotonic() + 60
    while True:
        r = httpx.post(server.url + "/admin/policies/reload", headers=_admin(server), timeout=30)
        if r.status_code != 409 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def _chat(server: Server, stream: bool) -> tuple[str, str, str | None]:
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": "What colour is the sky?"}],
        "temperature": 0,
        "max_tokens": 32,
        "user": "policy-e2e",
        "stream": stream,
    }
    if not stream:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=_admin(server), timeout=60).json()
        return r["id"], r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=_admin(server), timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = next(
        c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")
    )
    return chunks[0]["id"], text, finish


def test_live_rule_redacts_real_output_and_teaches(server: Server) -> None:
    _, before, _ = _chat(server, stream=False)
    # The rule redacts a word of what the model answers here, whatever that is: the demo model's
    # knowledge differs between machines (its float training is not bit-identical across CPUs).
    words = re.findall(r"[A-Za-z]{3,}", before)
    assert words, f"the model's answer has no word to redact: {before!r}"
    word = max(words, key=len)
    expected = re.sub(rf"(?i)\b{word}\b", "[COLOUR]", before)

    admin = _admin(server)
    key_id = hashlib.sha256(admin["Authorization"].removeprefix("Bearer ").encode()).hexdigest()[:16]
    (server.policies / "live.yaml").write_text(RULE.replace("{word}", word).replace("{key_id}", key_id))
    r = _reload(server)
    assert r.status_code == 200, r.text
    cid, plain, _ = _chat(server, stream=False)
    sid, streamed, _ = _chat(server, stream=True)
    assert plain == expected == streamed, (before, word)

    (server.policies / "zz-broken.yaml").write_text(BROKEN)
    r = _reload(server)
    assert r.status_code == 422 and "max_len" in r.text
    assert _chat(server, stream=False)[1] == plain  # the last good set is still enforced
    (server.policies / "zz-broken.yaml").unlink()

    client = redis.Redis.from_url(server.redis.url)
    keys = Keys("secondstage")
    deadline = time.time() + 10
    while client.get(keys.completion(sid)) is None and time.time() < deadline:
        time.sleep(0.2)
    record = json.loads(client.get(keys.completion(cid)))
    # What the rule redacted never reaches Redis in clear: no raw_text (SECONDSTAGE_STORE_RAW_OUTPUT is off),
    # and the pair's rejected side has the matched span withheld (docs/security.md).
    assert record["choices"][0]["text"] == plain and record["choices"][0].get("raw_text") is None
    assert any(d["rule_id"] == "live.colour" and d["action"] == "redact" for d in record["policy"]["decisions"])
    pairs = [json.loads(f[b"data"]) for _, f in client.xrange(keys.policy_pairs)]
    pair = next(p for p in pairs if p["completion_id"] == cid)
    assert pair["chosen"] == plain and pair["rule_ids"] == ["live.colour"]
    assert pair["rejected"] != before and word not in pair["rejected"] and "[withheld]" in pair["rejected"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'rule="live.colour"' in metrics

    # The align job reads these pairs as DPO data (dry run: look, train nothing, ack nothing).
    (server.policies / "live.yaml").unlink()
    _reload(server)
    dry = server.cli("align", "run", "--dry-run", "--min-feedback", "1")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    found = re.search(r"(\d+) policy pairs", dry.stderr)
    assert found and int(found.group(1)) >= 2, dry.stderr
