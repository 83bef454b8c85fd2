"""Two replicas on one Redis, real parts: one redis-server, two `secondstage serve` processes (real vLLM on the
demo model) on different ports sharing one var/ directory (versions included), each with its own
SECONDSTAGE_REPLICA_NAME, and a real Prometheus (Debian's `prometheus`) scraping both.

Prometheus sees both targets up and request counters from both; chat on both; feedback on one for a
completion the other made; both report the same active version; a policy reload on one reaches the other;
corrections sent across replicas train a version in a real `align run`, and both serve it within seconds;
Redis restarted under both (records spool, then replay); one replica SIGKILLed mid-stream while the other
keeps serving, then started again under its name, on the new version. At the end every completion id either
replica answered is in Redis.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from bench.harness import (
    ROOT,
    ServerProcess,
    ensure_demo_model,
    prometheus,
    running,
    secondstage_server,
    short_tmpdir,
)
from core.keys import Keys
from core.redis_server import PrivateRedis

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not found: install Debian's `prometheus` package (scripts/install.sh does)",
    ),
]

JOB = "secondstage"

# Prompts whose answers get a correction in the house style (as in test_loop.py), enough rows for align to
# train and its gate to pass on the demo model.
CORRECTED = [
    "What colour is the sky?",
    "What is the capital of France?",
    "What sound does a cow make?",
    "What is 3 plus 4?",
    "What is the opposite of hot?",
    "Which country is Tokyo in?",
]

RULE = """\
version: 1
rules:
  - id: replicas.zebra
    description: added while both replicas run
    kind: keywords
    keywords: [zebra]
    stages: [input]
    action: block
"""


def _chat(server: ServerProcess, i: int) -> str:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": f"What is {i % 10} plus 1?"}], "max_tokens": 16},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def _ask(server: ServerProcess, prompt: str) -> dict[str, Any]:
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _query(prom: str, expr: str) -> list[Any]:
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def _instances(prom: str, expr: str) -> set[str]:
    """The `instance` labels of the series `expr` returns."""
    return {series["metric"]["instance"] for series in _query(prom, expr)}


def _wait(what: str, check, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[PrivateRedis, ServerProcess, ServerProcess, Path]]:
    model = ensure_demo_model()
    base = short_tmpdir("replicas-")
    redis_server = PrivateRedis(base / "redis", appendfsync="always")
    redis_server.start()
    policies = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", policies)
    var = tmp_path / "var"
    servers = [
        secondstage_server(
            redis_url=redis_server.url,
            var_dir=var,
            log=tmp_path / f"{name}.log",
            model=model,
            policies=policies,
            engine=None,
            log_level="info",
            extra_env={
                "SECONDSTAGE_REPLICA_NAME": name,
                "SECONDSTAGE_RECONCILE_INTERVAL_S": "1",
                "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": "0.05",
            },
        )
        for name in ("serve-0", "serve-1")
    ]
    try:
        # One after the other, as a StatefulSet starts them (the first creates var/admin.key).
        with running(servers[0]), running(servers[1]):
            yield redis_server, servers[0], servers[1], var
    finally:
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_two_replicas_on_one_redis(
    fleet: tuple[PrivateRedis, ServerProcess, ServerProcess, Path], tmp_path: Path
) -> None:
    redis_server, a, b, var = fleet
    (tmp_path / "prometheus").mkdir()
    targets = {a.url.removeprefix("http://"), b.url.removeprefix("http://")}
    with prometheus(tmp_path / "prometheus", sorted(targets), job=JOB) as prom:
        _scenario(redis_server, a, b, var, prom, targets)


def _scenario(
    redis_server: PrivateRedis, a: ServerProcess, b: ServerProcess, var: Path, prom: str, targets: set[str]
) -> None:
    keys = Keys("secondstage")
    rc = redis.Redis.from_url(redis_server.url)
    ids: list[str] = []

    # Each replica its own spool in the shared var/.
    assert {p.name for p in (var / "spool").iterdir()} == {"serve-0", "serve-1"}
    for server, name in ((a, "serve-0"), (b, "serve-1")):
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["replica"] == name and health["skew"] is False

    # Chat on both; feedback on B for a completion A made (at once: A's writer may not have written it yet).
    made_on_a = _chat(a, 1)
    fb = httpx.post(b.url + "/v1/feedback", json={"completion_id": made_on_a, "thumbs": "up"}, timeout=10)
    assert fb.status_code == 200, fb.text
    ids += [made_on_a, _chat(b, 2)]

    # Prometheus scrapes both replicas, and sees the requests each one served.
    _wait("Prometheus to see both replicas up", lambda: _instances(prom, f'up{{job="{JOB}"}} == 1') == targets)
    _wait(
        "request counters from both replicas in Prometheus",
        lambda: _instances(prom, f'secondstage_requests_total{{job="{JOB}",route="/v1/chat/completions"}}') == targets,
    )

    # Both serve the active version (the registry's, read from Redis).
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "versions", "activate", "base"],
        env=a.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for server in (a, b):
        card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        assert card["version"] == card["wanted_version"] == "base"

    # A policy reload on A reaches B through Redis (B logs that it reloads for A).
    admin = {"Authorization": f"Bearer {(var / 'admin.key').read_text().strip()}"}
    (Path(a.env["SECONDSTAGE_POLICIES_DIR"]) / "zz-replicas.yaml").write_text(RULE)
    reload = httpx.post(a.url + "/admin/policies/reload", headers=admin, timeout=120)
    if reload.status_code == 409:  # A's own file watcher got there first; the admin reload is what announces
        time.sleep(3)
        reload = httpx.post(a.url + "/admin/policies/reload", headers=admin, timeout=120)
    assert reload.status_code == 200, reload.text
    version = reload.json()["version"]
    _wait(
        "B to reload for A",
        lambda: (
            "replica serve-0 reloaded policies" in b.log.read_text(errors="replace")
            and httpx.get(b.url + "/admin/policies", headers=admin, timeout=10).json()["version"] == version
        ),
    )

    # Corrections sent across replicas (on B for A's answers and on A for B's) train a new version in a real
    # `align run` on the shared Redis and versions directory; both replicas serve it within seconds.
    sent: list[str] = []
    for i, prompt in enumerate(CORRECTED):
        made_on, sent_to = (a, b) if i % 2 == 0 else (b, a)
        answer = _ask(made_on, prompt)
        assert answer["system_fingerprint"] == "base"
        ids.append(answer["id"])
        correction = "Arr, matey! " + answer["choices"][0]["message"]["content"]
        fb = httpx.post(
            sent_to.url + "/v1/feedback",
            json={"completion_id": answer["id"], "thumbs": "down", "correction": correction},
            timeout=10,
        )
        assert fb.status_code == 200, fb.text
        sent.append(fb.json()["id"])
    # Align reads what reached Redis, and each replica's writer is asynchronous: wait for every event there.
    _wait(
        "every correction in Redis",
        lambda: set(sent) <= {f[b"id"].decode() for _, f in rc.xrange(keys.feedback)},
    )
    run = subprocess.run(
        [sys.executable, "-m", "core.cli", "align", "run"],
        env={
            **a.env,
            "SECONDSTAGE_CANARY_ENABLED": "false",  # for everyone at once; test_canary.py: canaries
            # One round that teaches the style breaks a few demo-model facts, which the default gate refuses
            # (test_loop.py explains; test_gate_live.py proves the refusal): lenient on regression and drift here.
            "SECONDSTAGE_GATE_MAX_REGRESSIONS": "19",
            "SECONDSTAGE_GATE_MAX_DRIFT_NATS": "5",
            "SECONDSTAGE_GATE_MAX_DEGENERATION_INCREASE": "0.5",  # a handful of rows × 64 steps can loop
            # Nothing held out: the hash split of 6 random completion ids held 3 or more out in about one run of ten,
            # leaving fewer than min_feedback (4) rows — "insufficient", exit 0, nothing published (CI saw it). The
            # held-out checks have their own tests; this one proves the replicas see the version.
            "SECONDSTAGE_HELDOUT_SHARE": "0",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "published v1" in run.stderr, run.stdout + run.stderr  # the console (stderr) says what the run did
    for server in (a, b):
        _wait(
            f"{server.url} to serve v1",
            lambda server=server: _ask(server, CORRECTED[0])["system_fingerprint"] == "v1",
            timeout=30,
        )
        card = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]
        assert card["version"] == "v1", card

    # Redis restarted under both: chat goes on (records spool), and both replay when it is back.
    redis_server.kill()
    ids += [_chat(a, 3), _chat(b, 4)]
    redis_server.restart()
    ids += [_chat(a, 5), _chat(b, 6)]

    def all_in_redis() -> bool:
        return all(rc.get(keys.completion(cid)) is not None for cid in ids)

    # Both replayed what they spooled while Redis was down, and wrote what came after (this is the "restart
    # Redis → nothing lost" half). Checked before A is killed: a record is written a moment after its response,
    # and a SIGKILL in that moment loses what was only in the writer's memory queue.
    _wait("the records from around the Redis restart in Redis", all_in_redis)

    # A SIGKILLed mid-stream: B keeps serving.
    with httpx.stream(
        "POST",
        a.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 200, "stream": True},
        timeout=120,
    ) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        assert a.proc is not None
        os.killpg(a.proc.pid, signal.SIGKILL)  # the server and its engine workers, as when a pod dies
        with contextlib.suppress(httpx.HTTPError):  # the stream breaks (unless the rest was already sent)
            for _ in lines:
                pass
    a.proc.wait()
    a.stop()
    ids += [_chat(b, i) for i in range(7, 10)]

    # A back under its name (a StatefulSet's pod): it takes its spool again and serves.
    a.start()
    ids.append(_chat(a, 10))
    _wait("A to serve v1 again", lambda: _ask(a, CORRECTED[0])["system_fingerprint"] == "v1", timeout=30)

    _wait("every completion in Redis", all_in_redis)
    streamed = {f[b"id"].decode() for _, f in rc.xrange(keys.completions)}
    assert set(ids) <= streamed
    feedback = [json.loads(f[b"data"]) for _, f in rc.xrange(keys.feedback)]
    assert any(f["completion_id"] == made_on_a for f in feedback)
