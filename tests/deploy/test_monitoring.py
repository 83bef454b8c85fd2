"""The monitoring in deploy/ is checked by the tools that will load it.

`promtool check rules` (syntax, PromQL, templates) and `promtool test rules` (the alerts fire on the
series they are meant for and stay quiet on a healthy fleet) on deploy/prometheus/; the Grafana
dashboard is what deploy/grafana/dashboard.py generates, and every panel has a query and a
description. Whether the queries find data on a real server is tests/e2e/test_monitoring.py's job.
promtool comes with Debian's `prometheus` package, which scripts/install.sh installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: install Debian's `prometheus` package (scripts/install.sh does)",
)


def _run(*argv: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=120)


@promtool
def test_rules_pass_promtool_check() -> None:
    result = _run("promtool", "check", "rules", PROMETHEUS / "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@promtool
def test_rules_pass_their_unit_tests() -> None:
    result = _run("promtool", "test", "rules", "rules_test.yaml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


@promtool
def test_every_alert_is_unit_tested() -> None:
    rules = (PROMETHEUS / "rules.yaml").read_text()
    tests = (PROMETHEUS / "rules_test.yaml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")]
    assert alerts
    untested = [a for a in alerts if f"alertname: {a}\n" not in tests]
    assert not untested, f"alerts without a case in rules_test.yaml: {untested}"


def test_dashboard_json_is_generated() -> None:
    result = _run(sys.executable, GRAFANA / "dashboard.py", "--check")
    assert result.returncode == 0, result.stderr


def test_dashboard_panels_are_complete() -> None:
    dashboard = json.loads((GRAFANA / "secondstage.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["description"] and panel["targets"], panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]
        # A panel wider than the grid or overlapping the edge renders wrapped in Grafana.
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    # The views the operator needs (issue 11, section 4), by the metric that carries each.
    for metric in (
        "secondstage_requests_total",
        "secondstage_time_to_first_token_seconds_bucket",
        "secondstage_request_latency_seconds_bucket",
        "secondstage_completion_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "secondstage_policy_decisions_total",
        "secondstage_feedback_total",
        "secondstage_log_queue_depth",
        "secondstage_log_spool_records",
        "secondstage_log_redis_up",
        "secondstage_active_version_info",
        "secondstage_swaps_total",
        "secondstage_canary_share",
        "secondstage_canary_decisions_total",
        "secondstage_canary_signal",
        "secondstage_rate_limited_total",
        "secondstage_redis_up",
        # align runs, pushed to the Pushgateway (issue 9, section 5)
        "secondstage_align_last_run_timestamp_seconds",
        "secondstage_align_last_success_timestamp_seconds",
        "secondstage_align_run_duration_seconds",
        "secondstage_align_rows",
        "secondstage_align_gate_check_value",
        "secondstage_align_gate_check_passed",
        "secondstage_align_published_version_info",
        "secondstage_align_entries",
        "secondstage_align_dead_letters",
    ):
        assert metric in queries, f"no panel shows {metric}"
