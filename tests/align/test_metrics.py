"""align's run metrics: the gauges set per outcome (fresh registry), a failed push that changes nothing, and a push
to a real Prometheus Pushgateway read back from its /metrics."""

from __future__ import annotations

import shutil
import socket
import urllib.request
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

import align.job
from align.job import run_once
from align.metrics import JOB, AlignMetrics
from align.settings import AlignSettings
from bench.harness import pushgateway as harness_pushgateway

from .conftest import Server
from .test_job import seed_corrections

QUIET = Console(quiet=True)

GATE = {
    "passed": False,
    "failed": ["margin_gain"],
    "checks": {
        "metrics_finite": {"passed": True, "value": "all finite"},
        "weights_finite": {"passed": True, "value": True},
        "weights_changed": {"passed": True, "value": 0.25, "threshold": 0.0},
        "margin_gain": {"passed": False, "value": -0.5, "threshold": 0.0},
    },
}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_published_run_sets_every_figure() -> None:
    registry = CollectorRegistry()
    AlignMetrics(registry).record(
        "published",
        duration_s=12.5,
        counts={"dpo": 5, "kto": 3, "dpo_correction": 5},
        gate={**GATE, "passed": True, "failed": []},
        version="v3",
        ended_at=1000.0,
    )
    assert sample(registry, "secondstage_align_last_run_timestamp_seconds", outcome="published") == 1000.0
    assert sample(registry, "secondstage_align_last_success_timestamp_seconds") == 1000.0
    assert sample(registry, "secondstage_align_run_duration_seconds") == 12.5
    assert sample(registry, "secondstage_align_rows", kind="kto") == 3
    assert sample(registry, "secondstage_align_rows", kind="dpo_correction") == 5
    assert sample(registry, "secondstage_align_gate_check_value", check="margin_gain") == -0.5
    assert sample(registry, "secondstage_align_gate_check_value", check="weights_finite") == 1.0
    # A value that is not a number has no value series; its pass/fail still shows.
    assert sample(registry, "secondstage_align_gate_check_value", check="metrics_finite") is None
    assert sample(registry, "secondstage_align_gate_check_passed", check="metrics_finite") == 1.0
    assert sample(registry, "secondstage_align_published_version_info", version="v3") == 1.0


@pytest.mark.parametrize("outcome", ["insufficient", "dry_run", "locked", "failed", "worker"])
def test_a_run_that_publishes_nothing_sends_no_success(outcome: str) -> None:
    registry = CollectorRegistry()
    AlignMetrics(registry).record(outcome, duration_s=0.5, ended_at=2000.0)
    assert sample(registry, "secondstage_align_last_run_timestamp_seconds", outcome=outcome) == 2000.0
    assert sample(registry, "secondstage_align_run_duration_seconds") == 0.5
    names = {m.name for m in registry.collect()}
    # Absent, not zero: a pushadd then keeps the gateway's figures from the last run that had them.
    assert not names & {
        "secondstage_align_last_success_timestamp_seconds",
        "secondstage_align_published_version_info",
        "secondstage_align_gate_check_passed",
        "secondstage_align_rows",
    }


def test_a_refused_gate_records_which_check_failed() -> None:
    registry = CollectorRegistry()
    AlignMetrics(registry).record("gate_failed", duration_s=3.0, counts={"dpo": 5}, gate=GATE)
    assert sample(registry, "secondstage_align_gate_check_passed", check="margin_gain") == 0.0
    assert sample(registry, "secondstage_align_gate_check_passed", check="weights_changed") == 1.0
    assert sample(registry, "secondstage_align_last_success_timestamp_seconds") is None


def test_run_once_records_its_outcome(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    metrics = AlignMetrics(CollectorRegistry())
    result = run_once(settings, console=QUIET, client=client, metrics=metrics)
    assert result.status == "insufficient" and result.duration_s > 0
    assert sample(metrics.registry, "secondstage_align_last_run_timestamp_seconds", outcome="insufficient")
    assert sample(metrics.registry, "secondstage_align_rows", kind="kto") == 1


def test_a_run_that_raises_is_recorded_as_failed(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_corrections(server)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(align.job, "train_adapter", broken)
    metrics = AlignMetrics(CollectorRegistry())
    with pytest.raises(RuntimeError, match="disk full"):
        run_once(settings, console=QUIET, client=client, metrics=metrics)
    assert sample(metrics.registry, "secondstage_align_last_run_timestamp_seconds", outcome="failed")


def test_a_failed_push_is_logged_and_the_run_stands(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    out = StringIO()
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = run_once(
        settings.model_copy(update={"pushgateway_url": nowhere}), console=Console(file=out, width=300), client=client
    )
    assert result.status == "insufficient" and result.exit_code == 0
    assert f"could not push align metrics to the Pushgateway at {nowhere}" in out.getvalue()


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """A real Prometheus Pushgateway (Debian prometheus-pushgateway; scripts/install.sh installs it) on a free port."""
    if shutil.which("prometheus-pushgateway") is None and shutil.which("pushgateway") is None:
        pytest.skip(
            "prometheus-pushgateway is not installed (scripts/install.sh installs it: apt prometheus-pushgateway)"
        )
    with harness_pushgateway(tmp_path) as url:
        yield url


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """align's series on the gateway's /metrics: {(name, labels other than job and instance): value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("secondstage_align_"):
                assert s.labels.get("job") == JOB
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("job", "instance")))
                series[(s.name, labels)] = s.value
    return series


def test_runs_push_to_a_real_pushgateway(pushgateway: str) -> None:
    console = Console(quiet=True)
    published = AlignMetrics()
    published.record(
        "published", duration_s=9.0, counts={"dpo": 4}, gate={**GATE, "passed": True}, version="v1", ended_at=100.0
    )
    assert published.push(pushgateway, console)
    failed = AlignMetrics()
    failed.record("failed", duration_s=1.5, ended_at=200.0)
    assert failed.push(pushgateway, console)

    got = scrape(pushgateway)
    # The last run's outcome replaced the earlier one: one series, the one the alert asks about.
    last_runs = {k: v for k, v in got.items() if k[0] == "secondstage_align_last_run_timestamp_seconds"}
    assert last_runs == {("secondstage_align_last_run_timestamp_seconds", (("outcome", "failed"),)): 200.0}, got
    # What the failed run did not know stays from the published one.
    assert got[("secondstage_align_last_success_timestamp_seconds", ())] == 100.0
    assert got[("secondstage_align_run_duration_seconds", ())] == 1.5
    assert got[("secondstage_align_rows", (("kind", "dpo"),))] == 4
    assert got[("secondstage_align_gate_check_value", (("check", "margin_gain"),))] == -0.5
    assert got[("secondstage_align_gate_check_passed", (("check", "margin_gain"),))] == 0
    assert got[("secondstage_align_published_version_info", (("version", "v1"),))] == 1
