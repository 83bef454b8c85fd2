"""Metrics of one align run, pushed to a Prometheus Pushgateway (`SECONDSTAGE_PUSHGATEWAY_URL`).

An align run is a batch job: nothing stays up for Prometheus to scrape, so each run pushes what it knows to the
Pushgateway under job `secondstage_align`, and Prometheus scrapes the gateway (deploy/prometheus/). The idiom
for a pushed job is "last value" gauges, not counters (a counter that restarts at 1 every run counts nothing):

- `secondstage_align_last_run_timestamp_seconds{outcome}`: when the last run ended, labelled with how
  (published, insufficient, dry_run, gate_failed, locked, failed — align/job.py EXIT_CODES);
- `secondstage_align_last_success_timestamp_seconds`: when a run last published a version;
- `secondstage_align_run_duration_seconds`: how long the last run took;
- `secondstage_align_rows{kind}`: its training rows per kind (dpo, kto, and per source: dpo_correction, …);
- `secondstage_align_gate_check_value{check}` / `secondstage_align_gate_check_passed{check}`: each gate
  check of the last gated run (align/gate.py: the sanity and training-row checks, heldout_accuracy,
  heldout_margin, regression, anchor_drift, degeneration, policy_violations) — its value when it is a number
  (a check that could not decide, e.g. too few held-out rows, has none), and 1/0 for pass/fail;
- `secondstage_align_published_version_info{version}`: 1, labelled with the version the last success published.
- `secondstage_align_entries{outcome}`: stream entries (feedback, policy pairs) of the last run by what it did to
  them: `refused` (the gate refused the run; a refusal was counted against each entry it used) and
  `dead_lettered` (taken out of training after `max_refusals` refusals, align/refusals.py);
- `secondstage_align_dead_letters`: entries dead-lettered so far, all runs together (`<p>:align:dead_letters`) —
  a rise means feedback the gate keeps refusing was dropped from training.
- (to come with the canary: its promote / rollback decisions, one more family here.)

The push is a `pushadd` (HTTP POST): it replaces only the families this run sends, so a run sends only the
figures it knows — a locked run sends no gate checks, a failed one no last success — and the gateway keeps
the others from earlier runs. Each family is replaced whole, so `last_run_timestamp{outcome}` holds one series,
the last run's outcome, which is what the alerts ask about. A push that fails is logged and never fails the run:
metrics are a view of the job, not part of it.

Every run builds its own `AlignMetrics` on a fresh `CollectorRegistry` (injectable, for the tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway
from rich.console import Console

JOB = "secondstage_align"
"""The Pushgateway job (and the `job` label Prometheus gives the series when it scrapes with honor_labels)."""

PUSH_TIMEOUT_S = 10.0
"""A gateway that does not answer within this costs the run no more than this."""


def gate_check_number(value: Any) -> float | None:
    """A gate check's value as a number for its gauge: bools as 1/0, "inf" as +Inf; None when it is not a number
    (e.g. `metrics_finite`'s list of the metrics that were not finite — its `passed` gauge still says so)."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class AlignMetrics:
    """The gauges of one run on `registry`; `record` sets (and registers) those the run knows, `push` sends them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Built unregistered: `record` registers only the families this run has values for (see the docstring).
        self.last_run = Gauge(
            "secondstage_align_last_run_timestamp_seconds",
            "Unix time the last align run ended, labelled with its outcome.",
            ["outcome"],
            registry=None,
        )
        self.last_success = Gauge(
            "secondstage_align_last_success_timestamp_seconds",
            "Unix time an align run last published a version.",
            registry=None,
        )
        self.duration = Gauge(
            "secondstage_align_run_duration_seconds", "Wall-clock seconds the last align run took.", registry=None
        )
        self.rows = Gauge(
            "secondstage_align_rows",
            "Training rows of the last align run that read feedback, per kind (dpo, kto, and per source).",
            ["kind"],
            registry=None,
        )
        self.gate_value = Gauge(
            "secondstage_align_gate_check_value",
            "Value of each gate check in the last gated align run (only checks whose value is a number).",
            ["check"],
            registry=None,
        )
        self.gate_passed = Gauge(
            "secondstage_align_gate_check_passed",
            "1 if the gate check passed in the last gated align run, else 0.",
            ["check"],
            registry=None,
        )
        self.published = Gauge(
            "secondstage_align_published_version_info",
            "1, labelled with the version the last successful align run published.",
            ["version"],
            registry=None,
        )
        self.entries = Gauge(
            "secondstage_align_entries",
            "Feedback and policy-pair entries of the last align run by outcome: refused (a gate refusal counted "
            "against them), dead_lettered (taken out of training after max_refusals refusals).",
            ["outcome"],
            registry=None,
        )
        self.dead_letters = Gauge(
            "secondstage_align_dead_letters",
            "Feedback and policy-pair entries dead-lettered after max_refusals gate refusals, all runs together.",
            registry=None,
        )
        self._registered: set[Gauge] = set()

    def _use(self, gauge: Gauge) -> Gauge:
        if gauge not in self._registered:
            self.registry.register(gauge)
            self._registered.add(gauge)
        return gauge

    def record(
        self,
        outcome: str,
        *,
        duration_s: float,
        counts: Mapping[str, int] | None = None,
        gate: Mapping[str, Any] | None = None,
        version: str | None = None,
        ended_at: float | None = None,
        entries: Mapping[str, int] | None = None,
        dead_letters: int | None = None,
    ) -> None:
        """Set the run's figures. Once per run: a second call would add a second `outcome` series."""
        ended_at = time.time() if ended_at is None else ended_at
        self._use(self.last_run).labels(outcome=outcome).set(ended_at)
        self._use(self.duration).set(duration_s)
        if counts:
            rows = self._use(self.rows)
            for kind, n in counts.items():
                rows.labels(kind=kind).set(n)
        checks: Mapping[str, Mapping[str, Any]] = (gate or {}).get("checks") or {}
        if checks:
            values, passed = self._use(self.gate_value), self._use(self.gate_passed)
            for name, check in checks.items():
                passed.labels(check=name).set(1.0 if check.get("passed") else 0.0)
                number = gate_check_number(check.get("value"))
                if number is not None and not math.isnan(number):
                    values.labels(check=name).set(number)
        if entries:
            by_outcome = self._use(self.entries)
            for name, n in entries.items():
                by_outcome.labels(outcome=name).set(n)
        if dead_letters is not None:
            self._use(self.dead_letters).set(dead_letters)
        if outcome == "published":
            self._use(self.last_success).set(ended_at)
            if version is not None:
                self._use(self.published).labels(version=version).set(1)

    def push(self, url: str, console: Console) -> bool:
        """Send the recorded figures to the Pushgateway at `url`; False (and a logged warning) if that failed."""
        try:
            pushadd_to_gateway(url, job=JOB, registry=self.registry, timeout=PUSH_TIMEOUT_S)
        except (OSError, ValueError) as e:  # URLError/HTTPError are OSErrors; a malformed URL is a ValueError
            console.print(
                f"[yellow]could not push align metrics to the Pushgateway at {url}: {e}; the run's result stands "
                "(check SECONDSTAGE_PUSHGATEWAY_URL)"
            )
            return False
        return True
