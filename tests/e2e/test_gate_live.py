"""The gate on the live loop: real vLLM serving the demo model, real Redis, `secondstage align run` with real TRL.

Users send "Arr, matey!" corrections; the operator's align job trains them with an extreme learning rate, which
breaks what the model knew. The gate refuses the adapter: `align run` exits 3 naming the failed checks, nothing
is registered, and the server keeps answering with the version it had — same `system_fingerprint`, same answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
import redis

from bench.harness import ROOT
from core.keys import Keys
from tests.e2e.conftest import Server

pytestmark = pytest.mark.slow

CORRECTED = [
    "What colour is a tomato?",
    "What colour is coal?",
    "What colour is a lemon?",
    "What colour is milk?",
    "What colour is a frog?",
    "What colour is a pumpkin?",
    "What colour is chocolate?",
    "What colour is a flamingo?",
]
WATCHED = ["Why is the sky blue?", "What sound does a cow make?", "hello"]


def _ask(client, prompt: str):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=48
    )


def test_a_degrading_update_is_refused_and_the_served_version_stays(server: Server, openai_client) -> None:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(server.redis.url)
    keys = Keys()
    served_before = {p: _ask(openai_client, p) for p in WATCHED}
    version = served_before[WATCHED[0]].system_fingerprint
    versions_before = client.hlen(keys.versions)

    sent = []
    for prompt in CORRECTED:
        response = _ask(openai_client, prompt)
        correction = "Arr, matey! " + response.choices[0].message.content
        fb = httpx.post(
            server.url + "/v1/feedback", json={"completion_id": response.id, "correction": correction}, timeout=10
        )
        assert fb.status_code == 200, fb.text
        sent.append(fb.json()["id"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stored = {f[b"id"].decode() for _, f in client.xrange(keys.feedback)}
        if set(sent) <= stored:
            break
        time.sleep(0.2)
    assert set(sent) <= stored, "feedback never reached Redis"

    env = {"SECONDSTAGE_LEARNING_RATE": "0.5", "SECONDSTAGE_MAX_STEPS": "6", "SECONDSTAGE_HELDOUT_SHARE": "0.25"}
    run = subprocess.run(
        [sys.executable, "-m", "core.cli", "align", "run", "--json"],
        env={**server.env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 3, run.stdout + run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["outcome"] == "gate_failed" and report["version"] is None
    failed = report["gate"]["failed"]
    print("refused:", {name: report["gate"]["checks"][name]["value"] for name in failed})
    assert set(failed) & {"regression", "anchor_drift", "degeneration", "heldout_margin", "heldout_accuracy"}
    assert client.hlen(keys.versions) == versions_before

    # The server never switched: same version, same greedy answers.
    time.sleep(2)  # longer than a reconciliation tick (1 s here): a stray activation would have been seen
    served_after = {p: _ask(openai_client, p) for p in WATCHED}
    assert {r.system_fingerprint for r in served_after.values()} == {version}
    for p in WATCHED:
        assert served_after[p].choices[0].message.content == served_before[p].choices[0].message.content

    # Leave the session's server as found: this refused feedback must not train a later test's version.
    pending = client.xpending_range(keys.feedback, keys.align_group, min="-", max="+", count=1000)
    ids = [p["message_id"] for p in pending]
    if ids:
        client.xack(keys.feedback, keys.align_group, *ids)
