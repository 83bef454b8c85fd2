"""The dashboard and the rules in deploy/ work against a real Prometheus scraping a real secondstage.

A real `prometheus` (Debian's package, as scripts/install.sh installs it) scrapes the session's server
every second, and a real Pushgateway (Debian's `prometheus-pushgateway`) that a real `secondstage align run`
pushes to, as deploy/prometheus/prometheus.yaml does; it evaluates deploy/prometheus/rules.yaml. After chat,
feedback and an align round that publishes a version (then rolled back to base, so the by-version checks see
the traffic's version active), the published version runs as a canary for half the callers, started by hand
(`secondstage versions canary`), and callers on both sides chat and rate. Then every query of every panel in
deploy/grafana/secondstage.json must parse and return data (the canary panels: for both sides), and every rule
must evaluate without error; the recording rules give latency and feedback per version. A panel may be empty
only if it is on the short allow-list below, each entry saying what it needs. Last, the operator rolls the
canary back (`secondstage versions rollback`): the "Canary decisions" panel counts it, and the rollback alert,
which pages on the judge's rollbacks only, stays quiet — a healthy server fires nothing.

The session server judges canaries with the default criteria (200 requests a side, 30 minutes), far beyond
what this test sends, so the decision is the operator's; were the judge first, the rollback would be refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from bench.harness import ROOT, prometheus, pushgateway
from core.canary import Rollout, assign, routing_identity
from core.keys import Keys
from tests.e2e.conftest import Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not found: install Debian's `prometheus` package (scripts/install.sh does)",
    ),
    pytest.mark.skipif(
        shutil.which("prometheus-pushgateway") is None and shutil.which("pushgateway") is None,
        reason="prometheus-pushgateway not found: install Debian's package (scripts/install.sh does)",
    ),
]

DASHBOARD = ROOT / "deploy" / "grafana" / "secondstage.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
JOB = "secondstage"

# Panels that are legitimately empty after chat and feedback alone, and what would fill them.
EMPTY_ALLOWED = {
    "Private Redis up": "a replica with a private redis-server; the session server uses an external Redis",
    "Private Redis restarts": "a private redis-server that exited (tests/e2e/test_private_redis.py)",
    "Rate limited": "a 429 from a per-key limit; the session server sets none",
}
# Panels of the running canary: each of their queries must show both sides (by `role`) or the canary's version.
CANARY_PANELS = (
    "Canary version per replica",
    "Canary vs incumbent: per-request rates",
    "Canary vs incumbent: requests, rating, TTFT",
)
CANARY_SHARE = 0.5
ROLLBACK_ALERT = "SecondstageCanaryRolledBack"

# Corrections in a house style (as test_loop.py teaches), so the align round has DPO pairs beside the thumbs.
CORRECTED = [
    "What is the capital of France?",
    "What sound does a cow make?",
    "What is 3 plus 4?",
    "Which country is Tokyo in?",
]


def query(prom: str, expr: str) -> list[Any]:
    """The instant result of `expr`; fails the test naming the expression if Prometheus refuses it."""
    r = httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}\n{body}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for(prom: str, expr: str, timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    while not (result := query(prom, expr)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert result, f"no data for {expr} within {timeout} s"
    return result


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel, with the dashboard's variables as Grafana would fill them."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"].replace("$job", JOB).replace("$__rate_interval", "1m"))
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def traffic(server: Server) -> None:
    """Chat (plain and streamed), completions, thumbs both ways, a 404, and an operator's policy reload."""
    admin = {"Authorization": f"Bearer {(server.var_dir / 'admin.key').read_text().strip()}"}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        # The same rules again: counted as a reload (the Policy reloads panel); a 409 is the file watcher's own.
        deadline = time.monotonic() + 60
        while (reload := client.post("/admin/policies/reload", headers=admin)).status_code == 409:
            assert time.monotonic() < deadline, reload.text
            time.sleep(0.2)
        assert reload.status_code == 200, reload.text
        for i, prompt in enumerate(["What colour is the sky?", "What is 2 times 3?", "Where does a fish live?"]):
            messages = [{"role": "user", "content": prompt}]
            chat = client.post("/v1/chat/completions", json={"model": "demo", "messages": messages, "max_tokens": 12})
            assert chat.status_code == 200, chat.text
            thumbs = "up" if i % 2 == 0 else "down"
            fb = client.post("/v1/feedback", json={"completion_id": chat.json()["id"], "thumbs": thumbs})
            assert fb.status_code == 200, fb.text
        with client.stream(
            "POST", "/v1/chat/completions", json={"model": "demo", "messages": messages, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            for _ in stream.iter_lines():
                pass
        completion = client.post("/v1/completions", json={"model": "demo", "prompt": "Once upon", "max_tokens": 8})
        assert completion.status_code == 200, completion.text
        missing = client.post("/v1/feedback", json={"completion_id": "chatcmpl-missing", "thumbs": "up"})
        assert missing.status_code == 404


def corrections(server: Server) -> list[str]:
    """Chats corrected into a house style ("Arr, matey! " + the model's own answer); the feedback ids."""
    sent = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for prompt in CORRECTED:
            messages = [{"role": "user", "content": prompt}]
            chat = client.post("/v1/chat/completions", json={"model": "demo", "messages": messages, "max_tokens": 24})
            assert chat.status_code == 200, chat.text
            answer = chat.json()["choices"][0]["message"]["content"]
            body = {"completion_id": chat.json()["id"], "thumbs": "down", "correction": "Arr, matey! " + answer}
            fb = client.post("/v1/feedback", json=body)
            assert fb.status_code == 200, fb.text
            sent.append(fb.json()["id"])
    return sent


def align_round(server: Server, gateway: str, sent: list[str]) -> None:
    """A real `secondstage align run` that publishes and pushes its metrics; then back to base (see the docstring)."""
    # The log writer is asynchronous and align reads what reached Redis: wait for the feedback there.
    client = redis.Redis.from_url(server.redis.url)
    deadline = time.monotonic() + 60
    while not set(sent) <= (stored := {f[b"id"].decode() for _, f in client.xrange(Keys().feedback)}):
        assert time.monotonic() < deadline, f"{len(set(sent) - stored)} feedback events never reached Redis"
        time.sleep(0.2)
    client.close()
    # The Align panels need a published run; one round that teaches the style can break a few demo-model facts,
    # which the default gate refuses (as tests/e2e/test_loop.py explains), so regression and drift are lenient.
    # Nothing is held out: the held-out split goes by the hash of the (random) completion ids, and holding out
    # 4 of these 7 rows (a few percent of runs) leaves fewer than the 4 a run needs ("insufficient", seen here).
    lenient = {
        "SECONDSTAGE_GATE_MAX_REGRESSIONS": "19",
        "SECONDSTAGE_GATE_MAX_DRIFT_NATS": "5",
        "SECONDSTAGE_GATE_MAX_DEGENERATION_INCREASE": "0.5",  # a handful of rows × 64 steps can loop
        "SECONDSTAGE_HELDOUT_SHARE": "0",
    }
    aligner = dataclasses.replace(server, env={**server.env, **lenient, "SECONDSTAGE_PUSHGATEWAY_URL": gateway})
    run = aligner.cli("align", "run", "--json", timeout=1200)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["outcome"] == "published", report
    rollback = server.cli("versions", "activate", "base")
    assert rollback.returncode == 0, rollback.stdout + rollback.stderr
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["version"] != "base":
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)


def start_canary(server: Server, version: str) -> dict[str, list[str]]:
    """`secondstage versions canary VERSION` for half the callers; two `user`s routed to each side, by role.

    A caller's side is `core.canary.assign` of the run and its identity (no API key here: the `user` field),
    so the users are picked for this run and the answers' fingerprints confirm the routing.
    """
    started = server.cli("versions", "canary", version, "--share", str(CANARY_SHARE))
    assert started.returncode == 0, started.stdout + started.stderr
    client = redis.Redis.from_url(server.redis.url)
    state = Rollout(client, Keys()).state()
    client.close()
    assert state is not None and state.version == version and state.incumbent == "base", state
    users = [f"user-{i}" for i in range(64)]
    on_canary = [u for u in users if assign(state.run, CANARY_SHARE, routing_identity(None, u))]
    return {"canary": on_canary[:2], "incumbent": [u for u in users if u not in on_canary][:2]}


def canary_round(server: Server, users: dict[str, list[str]], version: str) -> None:
    """One chat per user, each answered by its side's version; per side one thumbs up rated 5, one down rated 2."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for role, names in users.items():
            for i, user in enumerate(names):
                messages = [{"role": "user", "content": f"What is {i + 2} plus {i + 3}?"}]
                body = {"model": "demo", "messages": messages, "max_tokens": 12, "user": user}
                chat = client.post("/v1/chat/completions", json=body)
                assert chat.status_code == 200, chat.text
                served = chat.json()["system_fingerprint"]
                assert served == (version if role == "canary" else "base"), (role, user, served)
                rating = {"thumbs": "up", "rating": 5} if i % 2 == 0 else {"thumbs": "down", "rating": 2}
                fb = client.post("/v1/feedback", json={"completion_id": chat.json()["id"], **rating})
                assert fb.status_code == 200, fb.text
                # TTFT (histogram and canary signal) counts streamed requests only: one per user too.
                with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
                    assert stream.status_code == 200
                    for _ in stream.iter_lines():
                        pass


def test_every_panel_and_rule_works_on_real_prometheus(server: Server, tmp_path: Path) -> None:
    target = server.url.removeprefix("http://")
    with (
        pushgateway(tmp_path) as gateway,
        prometheus(
            tmp_path, [target], job=JOB, rule_files=[RULES], pushgateways=[gateway.removeprefix("http://")]
        ) as prom,
    ):
        wait_for(prom, f'up{{job="{JOB}"}} == 1')
        # Two rounds a few scrapes apart: counters created by the first round rise in the second,
        # so rates and increases have something to show. The align round between them publishes a version.
        traffic(server)
        align_round(server, gateway, corrections(server))
        traffic(server)
        # The published version as a canary beside base, by hand. Its signals reach /metrics when the judge
        # reads them back from Redis (every SECONDSTAGE_CANARY_EVAL_INTERVAL_S, 30 s by default); a second
        # round after the first is seen makes the per-version counters and histograms rise, as above.
        published = query(prom, 'secondstage_align_published_version_info{job="secondstage_align"}')
        [version] = {s["metric"]["version"] for s in published}
        users = start_canary(server, version)
        wait_for(prom, f'secondstage_canary_info{{job="{JOB}", version="{version}"}}')  # the server routes to it
        canary_round(server, users, version)
        wait_for(prom, f'count(secondstage_canary_signal{{job="{JOB}", signal="requests"}} > 0) == 2', timeout=120)
        canary_round(server, users, version)
        wait_for(prom, f'count(secondstage_canary_signal{{job="{JOB}", signal="ratings"}} >= 4) == 2', timeout=120)
        wait_for(prom, f'sum(secondstage_feedback_total{{job="{JOB}"}}) >= 4')
        wait_for(prom, f'secondstage_log_records_written_total{{job="{JOB}"}} > 0')
        wait_for(prom, 'secondstage_align_published_version_info{job="secondstage_align"}')
        time.sleep(3)  # a few more scrapes and rule evaluations after the last request

        empty = []
        for title, expr in panel_queries():
            result = query(prom, expr)
            if not result and title not in EMPTY_ALLOWED:
                empty.append(f"{title}: {expr}")
            if title in CANARY_PANELS:
                shown = {s["metric"].get("role") or s["metric"].get("version") for s in result}
                expected = {version} if title == "Canary version per replica" else {"canary", "incumbent"}
                assert shown == expected, f"{title}: {expr} shows {shown}, not {expected}"
        assert not empty, "panels without data:\n" + "\n".join(empty)

        groups = yaml.safe_load(RULES.read_text())["groups"]
        for rule in (rule for group in groups for rule in group["rules"]):
            query(prom, rule["expr"])  # parses and evaluates

        # Prometheus loaded the same rules and evaluates them all without error.
        loaded = httpx.get(prom + "/api/v1/rules", timeout=30).json()["data"]["groups"]
        evaluated = {r.get("name"): r for g in loaded for r in g["rules"]}
        expected = {rule.get("record") or rule.get("alert") for group in groups for rule in group["rules"]}
        assert expected <= set(evaluated), expected - set(evaluated)
        unhealthy = {n: r.get("lastError") for n, r in evaluated.items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy

        # Latency and feedback by version reach the recording rules: base is active (the incumbent), the
        # canary's version served its share beside it.
        [active] = wait_for(prom, f'secondstage_active_version_info{{job="{JOB}"}}')
        assert active["metric"]["version"] == "base", active
        for served in ("base", version):
            ttft = wait_for(prom, f'job_version:secondstage_time_to_first_token_seconds:p95_5m{{version="{served}"}}')
            assert 0 < float(ttft[0]["value"][1]) < 120, (served, ttft)
            thumbs = wait_for(prom, f'job_version:secondstage_thumbs_up:ratio_increase1h{{version="{served}"}}')
            assert 0 < float(thumbs[0]["value"][1]) < 1, (served, thumbs)  # both thumbs were sent on each version

        # The operator rolls the canary back (refused, exit 2, were it no longer running): the decisions panel
        # counts it once the judge reads the deployment's counter back from Redis (every eval interval).
        rollback = server.cli("versions", "rollback")
        assert rollback.returncode == 0, rollback.stdout + rollback.stderr
        [decisions_expr] = [expr for title, expr in panel_queries() if title == "Canary decisions"]
        decided = wait_for(prom, f"({decisions_expr}) > 0", timeout=120)
        # This rollback, by the operator, is the only decision in the window: the judge made none.
        assert [(d["metric"]["decision"], d["metric"]["trigger"]) for d in decided] == [("rollback", "operator")], (
            decided
        )
        wait_for(prom, f'absent(secondstage_canary_info{{job="{JOB}"}})')  # the server follows: base serves everyone
        time.sleep(3)  # rule evaluations after the decision is in the series

        # The rollback alert pages on the judge's rollbacks only ("operators' own rollbacks do not page"): its
        # expression, pointed at the operator's trigger, sees this rollback, and the alert itself stays quiet.
        [alert_rule] = [r for g in groups for r in g["rules"] if r.get("alert") == ROLLBACK_ALERT]
        assert 'trigger="auto"' in alert_rule["expr"], alert_rule
        seen = query(prom, alert_rule["expr"].replace('trigger="auto"', 'trigger="operator"'))
        assert [s["metric"]["job"] for s in seen] == [JOB], seen
        loaded = httpx.get(prom + "/api/v1/rules", timeout=30).json()["data"]["groups"]
        [alerting] = [r for g in loaded for r in g["rules"] if r["name"] == ROLLBACK_ALERT]
        assert alerting["health"] == "ok" and alerting["state"] == "inactive", alerting

        # One active version across replicas; a healthy server fires nothing.
        skew = wait_for(prom, "job_model_name:secondstage_active_versions:count")
        assert [float(s["value"][1]) for s in skew] == [1.0], skew
        alerts = httpx.get(prom + "/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        firing = [a for a in alerts if a["state"] == "firing"]
        assert not firing, firing
