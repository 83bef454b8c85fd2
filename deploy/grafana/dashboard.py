"""Generates deploy/grafana/secondstage.json, the Grafana dashboard of a secondstage fleet.

Run `python deploy/grafana/dashboard.py` after changing a panel here, and commit both files;
`--check` exits 1 when the JSON is not what this file generates (tests/deploy/test_monitoring.py
runs it). The panels below are the source: each is a title, what it tells the operator, and its
PromQL; layout, datasource and Grafana's boilerplate are filled in the same way for all of them.
The queries use two dashboard variables, `$job` (the Prometheus job(s) scraping serve) and Grafana's
own `$__rate_interval`; tests/e2e/test_monitoring.py runs every one of them on a real Prometheus.
The Align row reads what each align run pushes to the Pushgateway (align/metrics.py), under the job
`secondstage_align` (Prometheus keeps that label when it scrapes the gateway with `honor_labels: true`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).with_name("secondstage.json")
J = 'job=~"$job"'
RATE = "$__rate_interval"
ALIGN = 'job="secondstage_align"'


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 8


def quantiles(metric: str, by: str, window: str = RATE) -> tuple[tuple[str, str], ...]:
    """p50/p95/p99 of a histogram over `window`, one series per `by` labels."""
    legend = " ".join("{{" + label.strip() + "}}" for label in by.split(","))
    return tuple(
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{J}}}[{window}])))",
            f"p{round(q * 100)} {legend}",
        )
        for q in (0.5, 0.95, 0.99)
    )


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Traffic",
        [
            Panel(
                "Requests by route and status",
                "HTTP requests per second on every replica, by route and status code.",
                (
                    (
                        f"sum by (route, status) (rate(secondstage_requests_total{{{J}}}[{RATE}]))",
                        "{{route}} {{status}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Errors by status",
                "4xx (the client's) and 5xx (ours) responses per second, by status code and route.",
                (
                    (
                        f'sum by (status, route) (rate(secondstage_requests_total{{{J}, status=~"[45].."}}[{RATE}]))',
                        "{{status}} {{route}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "5xx ratio",
                "Share of responses that are server errors, per route (0 when there are none).",
                (
                    (
                        f'(sum by (route) (rate(secondstage_requests_total{{{J}, status=~"5.."}}[{RATE}]))'
                        f" or sum by (route) (rate(secondstage_requests_total{{{J}}}[{RATE}])) * 0)"
                        f" / sum by (route) (rate(secondstage_requests_total{{{J}}}[{RATE}]))",
                        "{{route}}",
                    ),
                ),
                unit="percentunit",
            ),
        ],
    ),
    (
        "Latency and throughput by version",
        [
            Panel(
                "Time to first token by version",
                "From request arrival to the first content sent (policy hold-back included), per model version.",
                quantiles("secondstage_time_to_first_token_seconds", "version"),
                unit="s",
            ),
            Panel(
                "Request latency by version",
                "Whole-request latency of completions, per model version and route.",
                quantiles("secondstage_request_latency_seconds", "version, route"),
                unit="s",
            ),
            Panel(
                "Tokens per second by version",
                "Completion tokens generated and prompt tokens processed per second, per model version.",
                (
                    (
                        f"sum by (version) (rate(secondstage_completion_tokens_total{{{J}}}[{RATE}]))",
                        "completion {{version}}",
                    ),
                    (
                        f"sum by (version) (rate(secondstage_prompt_tokens_total{{{J}}}[{RATE}]))",
                        "prompt {{version}}",
                    ),
                ),
                unit="short",
            ),
            Panel(
                "Engine: running and waiting requests",
                "vLLM's scheduler per replica: requests running in the batch and waiting for room.",
                (
                    (f"sum by (instance) (vllm:num_requests_running{{{J}}})", "running {{instance}}"),
                    (f"sum by (instance) (vllm:num_requests_waiting{{{J}}})", "waiting {{instance}}"),
                ),
            ),
            Panel(
                "Engine: KV cache usage",
                "vLLM's KV cache in use per replica; near 1 it preempts and queues requests.",
                ((f"max by (instance) (vllm:kv_cache_usage_perc{{{J}}})", "{{instance}}"),),
                unit="percentunit",
            ),
            Panel(
                "Engine: preemptions",
                "Requests vLLM preempted per second for lack of KV cache (recomputed later, slower).",
                ((f"sum by (instance) (rate(vllm:num_preemptions_total{{{J}}}[{RATE}]))", "{{instance}}"),),
            ),
        ],
    ),
    (
        "Policy",
        [
            Panel(
                "Policy decisions by rule and action",
                "Decisions per second, by rule, action and stage (input before the engine, output on the stream).",
                (
                    (
                        f"sum by (rule, action, stage) (rate(secondstage_policy_decisions_total{{{J}}}[{RATE}]))",
                        "{{rule}} {{action}} ({{stage}})",
                    ),
                ),
                width=12,
            ),
            Panel(
                "Policy rule set per replica",
                "The rule set version each replica enforces; more than one for long means a reload failed.",
                ((f"max by (instance, version) (secondstage_policy_ruleset_info{{{J}}})", "{{instance}} {{version}}"),),
                kind="table",
                width=6,
            ),
            Panel(
                "Policy reloads",
                "Reload attempts by result; an error keeps the previous rule set.",
                ((f"sum by (result) (increase(secondstage_policy_reloads_total{{{J}}}[{RATE}]))", "{{result}}"),),
                width=6,
            ),
        ],
    ),
    (
        "Feedback",
        [
            Panel(
                "Feedback by version and kind",
                "Feedback events per second, by the version that made the completion and the kind of feedback.",
                (
                    (
                        f"sum by (version, kind) (rate(secondstage_feedback_total{{{J}}}[{RATE}]))",
                        "{{version}} {{kind}}",
                    ),
                ),
                width=12,
            ),
            Panel(
                "Thumbs-up ratio by version",
                "Share of thumbs that are up over the last hour, per version: the live signal of a new version.",
                (
                    (
                        f'sum by (version) (increase(secondstage_feedback_total{{{J}, kind="thumbs_up"}}[1h]))'
                        f' / sum by (version) (increase(secondstage_feedback_total{{{J}, kind=~"thumbs_.*"}}[1h]))',
                        "{{version}}",
                    ),
                ),
                unit="percentunit",
                width=12,
            ),
        ],
    ),
    (
        "Versions",
        [
            Panel(
                "Active version per replica",
                "The version new requests are served with, per replica; they should agree within seconds.",
                ((f"max by (instance, version) (secondstage_active_version_info{{{J}}})", "{{instance}} {{version}}"),),
                kind="table",
            ),
            Panel(
                "Distinct active versions",
                "How many versions the replicas serve; above 1 for long is version skew (an alert).",
                ((f"count(count by (version) (secondstage_active_version_info{{{J}}}))", "versions"),),
                kind="stat",
            ),
            Panel(
                "Version swaps",
                "Version activations by result; an error leaves the replica on its previous version.",
                ((f"sum by (result) (increase(secondstage_swaps_total{{{J}}}[{RATE}]))", "{{result}}"),),
            ),
            Panel(
                "Swap duration",
                "Time to load and activate a version, per replica, over the last hour.",
                quantiles("secondstage_swap_duration_seconds", "instance", window="1h"),
                unit="s",
            ),
            Panel(
                "LoRA adapters loaded",
                "Adapters resident in each replica's engine.",
                ((f"max by (instance) (secondstage_loaded_adapters{{{J}}})", "{{instance}}"),),
            ),
        ],
    ),
    (
        "Canary",
        [
            Panel(
                "Canary share per replica",
                "Share of caller identities each replica routes to the running canary (0: none runs); the "
                "replicas agree within seconds, since the state is in Redis.",
                ((f"max by (instance) (secondstage_canary_share{{{J}}})", "{{instance}}"),),
                unit="percentunit",
            ),
            Panel(
                "Canary version per replica",
                "The version each replica serves as a canary beside the incumbent (absent: no canary).",
                ((f"max by (instance, version) (secondstage_canary_info{{{J}}})", "{{instance}} {{version}}"),),
                kind="table",
            ),
            Panel(
                "Canary decisions",
                "Promotions and rollbacks in the window, by who decided (auto: the replicas' judge; operator: the "
                "CLI). The count is the deployment's, read from Redis, so every replica reports the same: max.",
                (
                    (
                        f"max by (decision, trigger) (increase(secondstage_canary_decisions_total{{{J}}}[1h]))",
                        "{{decision}} {{trigger}}",
                    ),
                ),
            ),
            Panel(
                "Canary vs incumbent: per-request rates",
                "The running canary's rates against the incumbent's over the same run, the figures the judge "
                "tests: negative feedback (thumbs down or correction), thumbs up, errors and policy violations "
                "per request.",
                tuple(
                    (
                        f'max by (role) (secondstage_canary_signal{{{J}, signal="{signal}"}})'
                        f' / max by (role) (secondstage_canary_signal{{{J}, signal="requests"}})',
                        f"{signal} {{{{role}}}}",
                    )
                    for signal in ("negative", "thumbs_up", "errors", "violations")
                ),
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Canary vs incumbent: requests, rating, TTFT",
                "Requests each side served in the run (the judge waits for SECONDSTAGE_CANARY_MIN_REQUESTS on "
                "both), the mean rating, and the mean time to first token in seconds.",
                tuple(
                    (f'max by (role) (secondstage_canary_signal{{{J}, signal="{signal}"}})', f"{signal} {{{{role}}}}")
                    for signal in ("requests", "rating_mean", "ttft_mean")
                ),
                width=12,
            ),
        ],
    ),
    (
        "Log writer and Redis",
        [
            Panel(
                "Log writer queue and spool",
                "Records waiting in memory for Redis, and on disk while Redis is unreachable, per replica.",
                (
                    (f"max by (instance) (secondstage_log_queue_depth{{{J}}})", "queue {{instance}}"),
                    (f"max by (instance) (secondstage_log_spool_records{{{J}}})", "spool {{instance}}"),
                ),
            ),
            Panel(
                "Log records",
                "Records per second written to Redis, spooled to disk, dropped (spool full: lost), and write errors.",
                (
                    (
                        f"sum by (instance) (rate(secondstage_log_records_written_total{{{J}}}[{RATE}]))",
                        "written {{instance}}",
                    ),
                    (
                        f"sum by (instance) (rate(secondstage_log_records_spooled_total{{{J}}}[{RATE}]))",
                        "spooled {{instance}}",
                    ),
                    (
                        f"sum by (instance) (rate(secondstage_log_records_dropped_total{{{J}}}[{RATE}]))",
                        "dropped {{instance}}",
                    ),
                    (
                        f"sum by (instance) (rate(secondstage_log_write_errors_total{{{J}}}[{RATE}]))",
                        "errors {{instance}}",
                    ),
                ),
            ),
            Panel(
                "Redis reachable",
                "1 while each replica's log writer reaches Redis; 0 while it spools to disk.",
                ((f"min by (instance) (secondstage_log_redis_up{{{J}}})", "{{instance}}"),),
            ),
            Panel(
                "Private Redis up",
                "Replicas without an external Redis supervise their own redis-server: 1 while it answers.",
                ((f"min by (instance) (secondstage_redis_up{{{J}}})", "{{instance}}"),),
            ),
            Panel(
                "Private Redis restarts",
                "Restarts of the private redis-server by result (failed: it exited while starting).",
                ((f"sum by (instance, result) (increase(secondstage_redis_restarts_total{{{J}}}[1h]))", "{{result}}"),),
            ),
        ],
    ),
    (
        "Limits",
        [
            Panel(
                "Rate limited",
                "Requests refused with 429 per second, by the limit that refused them.",
                ((f"sum by (limit) (rate(secondstage_rate_limited_total{{{J}}}[{RATE}]))", "{{limit}}"),),
                unit="reqps",
                width=12,
            ),
            Panel(
                "Limiter failing open",
                "Limit checks skipped because Redis did not answer: those requests were served unlimited.",
                ((f"sum by (instance) (rate(secondstage_rate_limit_errors_total{{{J}}}[{RATE}]))", "{{instance}}"),),
                unit="reqps",
                width=12,
            ),
        ],
    ),
    (
        "Align",
        [
            Panel(
                "Align: last run",
                "When the last align run ended and how: published, insufficient (too little feedback), dry_run, "
                "gate_failed, locked (another run held the lock) or failed.",
                ((f"secondstage_align_last_run_timestamp_seconds{{{ALIGN}}} * 1000", "{{outcome}}"),),
                unit="dateTimeAsIso",
                kind="table",
            ),
            Panel(
                "Align: time since last success",
                "Seconds since an align run last published a version (SecondstageAlignStale fires past a day).",
                ((f"time() - secondstage_align_last_success_timestamp_seconds{{{ALIGN}}}", "since success"),),
                unit="s",
            ),
            Panel(
                "Align: run duration",
                "Wall-clock time of the last align run (read, train, gate, publish).",
                ((f"secondstage_align_run_duration_seconds{{{ALIGN}}}", "duration"),),
                unit="s",
            ),
            Panel(
                "Align: training rows by kind",
                "Rows of the last run that read feedback: DPO pairs, KTO rows, and per source (corrections, "
                "choices, policy rewrites, thumbs; skipped and duplicate rows).",
                ((f"secondstage_align_rows{{{ALIGN}}}", "{{kind}}"),),
            ),
            Panel(
                "Align: gate checks",
                "Each gate check of the last gated run: its value and whether it passed (1) or failed (0); "
                "thresholds are in the version's manifest and `align run --json`.",
                (
                    (f"secondstage_align_gate_check_value{{{ALIGN}}}", "{{check}} value"),
                    (f"secondstage_align_gate_check_passed{{{ALIGN}}}", "{{check}} passed"),
                ),
                kind="table",
            ),
            Panel(
                "Align: refusals and dead letters",
                "Feedback entries the last run's gate refusal counted against (refused) and took out of training "
                "after SECONDSTAGE_MAX_REFUSALS refusals (dead_lettered), and the deployment's dead letters so far "
                "(SecondstageAlignDeadLetters fires when it rises; `secondstage align refusals` lists them).",
                (
                    (f"secondstage_align_entries{{{ALIGN}}}", "{{outcome}} (last run)"),
                    (f"secondstage_align_dead_letters{{{ALIGN}}}", "dead letters so far"),
                ),
            ),
            Panel(
                "Align: published version",
                "The version the last successful align run published (servers may since have activated another).",
                ((f"secondstage_align_published_version_info{{{ALIGN}}}", "{{version}}"),),
                kind="table",
            ),
        ],
    ),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, object]:
    out: dict[str, object] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                # A table shows the labels of what is there now; the others a range.
                "instant": panel.kind == "table",
                "range": panel.kind != "table",
            }
            for i, (expr, legend) in enumerate(panel.queries)
        ],
    }
    if panel.kind == "table":
        out["transformations"] = [{"id": "labelsToFields", "options": {}}]
    return out


def dashboard() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    y, panel_id = 0, 1
    for row_title, row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y, x = panel_id + 1, y + 1, 0
        for panel in row:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(panel, panel_id, x, y))
            panel_id, x = panel_id + 1, x + panel.width
        y += 8
    return {
        "uid": "secondstage",
        "title": "secondstage",
        "description": "A secondstage fleet: traffic, latency by version, engine, policy, feedback, versions, "
        "log writer and Redis, limits, align runs. Generated by deploy/grafana/dashboard.py.",
        "tags": ["secondstage"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                },
                {
                    "name": "job",
                    "label": "Job",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(secondstage_active_version_info, job)", "refId": "job"},
                    "definition": "label_values(secondstage_active_version_info, job)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".+",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if secondstage.json is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
