"""The dashboard and the rules in deploy/ work against a real Prometheus scraping a real secondstage.

A real `prometheus` (Debian's package, as scripts/install.sh installs it) scrapes the session's server
every second and evaluates deploy/prometheus/rules.yaml. After chat and feedback traffic, every
query of every panel in deploy/grafana/secondstage.json must parse and return data, and every rule
must evaluate without error; the recording rules give latency and feedback per version. A panel may
be empty only if it is on the short allow-list below, each entry saying what it needs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.harness import ROOT, prometheus
from tests.e2e.conftest import Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None,
        reason="prometheus not found: install Debian's `prometheus` package (scripts/install.sh does)",
    ),
]

DASHBOARD = ROOT / "deploy" / "grafana" / "secondstage.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
JOB = "secondstage"

# Panels that are legitimately empty after chat and feedback alone, and what would fill them.
EMPTY_ALLOWED = {
    "Policy reloads": "a policy reload (the series appears on the first one)",
    "Version swaps": "an align run or `versions activate` (test_loop.py does one)",
    "Private Redis up": "a replica with a private redis-server; the session server uses an external Redis",
    "Private Redis restarts": "a private redis-server that exited (tests/e2e/test_private_redis.py)",
    "Rate limited": "a 429 from a per-key limit; the session server sets none",
    **dict.fromkeys(
        (
            "Canary version per replica",
            "Canary vs incumbent: per-request rates",
            "Canary vs incumbent: requests, rating, TTFT",
        ),
        "a running canary (tests/e2e/test_canary.py); the session server activates versions at once",
    ),
    # The Align row reads what align runs push to a Pushgateway (align/metrics.py; a real one is tested in
    # tests/align/test_metrics.py); this Prometheus scrapes only the server, and no align run happens here.
    **dict.fromkeys(
        (
            "Align: last run",
            "Align: time since last success",
            "Align: run duration",
            "Align: training rows by kind",
            "Align: gate checks",
            "Align: published version",
        ),
        "an align run pushing to a Pushgateway that this Prometheus scrapes",
    ),
}


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
    """Chat (plain and streamed), completions, thumbs both ways, and a 404."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
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


def test_every_panel_and_rule_works_on_real_prometheus(server: Server, tmp_path: Path) -> None:
    target = server.url.removeprefix("http://")
    with prometheus(tmp_path, [target], job=JOB, rule_files=[RULES]) as prom:
        wait_for(prom, f'up{{job="{JOB}"}} == 1')
        # Two rounds a few scrapes apart: counters created by the first round rise in the second,
        # so rates and increases have something to show.
        traffic(server)
        time.sleep(3)
        traffic(server)
        wait_for(prom, f'sum(secondstage_feedback_total{{job="{JOB}"}}) >= 4')
        wait_for(prom, f'secondstage_log_records_written_total{{job="{JOB}"}} > 0')
        time.sleep(3)  # a few more scrapes and rule evaluations after the last request

        empty = []
        for title, expr in panel_queries():
            if not query(prom, expr) and title not in EMPTY_ALLOWED:
                empty.append(f"{title}: {expr}")
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

        # Latency and feedback by version reach the recording rules; a healthy server fires nothing.
        [active] = wait_for(prom, f'secondstage_active_version_info{{job="{JOB}"}}')
        version = active["metric"]["version"]
        ttft = wait_for(prom, f'job_version:secondstage_time_to_first_token_seconds:p95_5m{{version="{version}"}}')
        assert 0 < float(ttft[0]["value"][1]) < 120, ttft
        thumbs = wait_for(prom, f'job_version:secondstage_thumbs_up:ratio_increase1h{{version="{version}"}}')
        assert 0 < float(thumbs[0]["value"][1]) < 1, thumbs  # both thumbs were sent on this version
        skew = wait_for(prom, "job_model_name:secondstage_active_versions:count")
        assert [float(s["value"][1]) for s in skew] == [1.0], skew
        alerts = httpx.get(prom + "/api/v1/alerts", timeout=30).json()["data"]["alerts"]
        firing = [a for a in alerts if a["state"] == "firing"]
        assert not firing, firing
