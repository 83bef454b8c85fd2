"""What a gate refusal does to the feedback it used, on a real redis-server (training and the gate are fakes).

- Refused feedback does not starve newer feedback: the per-identity cap keeps each identity's newest entries,
  so a batch the gate refused cannot fill the cap ahead of what the same identity sent since.
- A batch is not retried forever: each entry's refusals are counted in Redis, and an entry refused
  `max_refusals` times is acknowledged and dead-lettered (never read again, listed for the operator).
- Feedback a published version consumed is never trained again, refused before or not.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from rich.console import Console
from typer.testing import CliRunner

import align.job
from align.cli import align_app
from align.job import run_once
from align.metrics import AlignMetrics
from align.settings import AlignSettings
from core.keys import Keys

from .conftest import Server
from .test_job import pending

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"


def fake_trainer(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Training replaced by an adapter directory written at once; returns the feedback ids each run trained on."""
    runs: list[list[str]] = []

    def fake_train(settings: AlignSettings, data: Any, work_dir: Path, **kw: Any) -> Any:
        runs.append(list(data.feedback_ids))
        adapter = work_dir / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        return SimpleNamespace(metrics={}, adapter_dir=adapter, lora_rank=8)

    monkeypatch.setattr(align.job, "_train", fake_train)
    return runs


class FakeGate:
    """The gate replaced by a verdict the test sets: `passed` False refuses on heldout_accuracy."""

    def __init__(self) -> None:
        self.passed = False

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        check = {"value": 0.25, "threshold": 0.5, "bound": "min", "passed": self.passed}
        return {
            "passed": self.passed,
            "failed": [] if self.passed else ["heldout_accuracy"],
            "checks": {"heldout_accuracy": check},
        }


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> FakeGate:
    fake = FakeGate()
    monkeypatch.setattr(align.job, "evaluate_gate", fake)
    return fake


def corrections(server: Server, n: int, *, key: str | None = None, tag: str = "") -> list[str]:
    """`n` corrections on fresh completions, posted by the API key `key` (None: anonymous)."""
    return [
        server.feedback(
            server.completion(f"Question {tag}{i}?", f"Wrong {tag}{i}.", key=key),
            correction=f"Right answer {tag}{i}.",
            key=key,
        )
        for i in range(n)
    ]


def test_refused_feedback_filling_a_users_cap_does_not_starve_that_users_newer_feedback(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, gate: FakeGate
) -> None:
    """The README's finding: a refused batch stays pending and is read first; when it fills the identity's cap,
    the identity's newer feedback was never read, and the run (fixed seed) trained and was refused the same way,
    round after round. Now the cap keeps the newest entries: the next run trains on what alice sent since."""
    settings = settings.model_copy(update={"max_rows_per_user": 3, "min_feedback": 1, "policies_dir": POLICIES})
    trained = fake_trainer(monkeypatch)
    old = corrections(server, 3, key="k-alice", tag="old")
    first = run_once(settings, console=QUIET, client=client)
    assert first.status == "gate_failed" and sorted(trained[0]) == sorted(old)

    new = corrections(server, 2, key="k-alice", tag="new")
    second = run_once(settings, console=QUIET, client=client)
    assert second.status == "gate_failed"
    assert set(new) <= set(trained[1]), f"alice's newer feedback was starved: trained {trained[1]}"
    assert len(trained[1]) == 3  # still her cap: the two new ones and the newest of the refused batch
    assert set(trained[1]) - set(new) == {old[-1]}


def test_an_entry_refused_max_refusals_times_is_dead_lettered_and_one_refused_fewer_times_is_read_again(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, gate: FakeGate
) -> None:
    keys = Keys(settings.redis_prefix)
    settings = settings.model_copy(update={"max_refusals": 2, "min_feedback": 1, "policies_dir": POLICIES})
    trained = fake_trainer(monkeypatch)
    old = corrections(server, 3, tag="old")
    first = run_once(settings, console=QUIET, client=client)
    assert first.status == "gate_failed" and first.entries == {"refused": 3, "dead_lettered": 0}

    newer = corrections(server, 2, tag="new")
    metrics = AlignMetrics(CollectorRegistry())
    second = run_once(settings, console=QUIET, client=client, metrics=metrics)
    assert second.status == "gate_failed" and sorted(trained[1]) == sorted(old + newer)
    # The old entries have now been refused twice (max_refusals): acknowledged and dead-lettered at once.
    assert second.entries == {"refused": 5, "dead_lettered": 3} and second.dead_letters == 3
    assert pending(client, keys) == len(newer)
    assert metrics.registry.get_sample_value("secondstage_align_entries", {"outcome": "dead_lettered"}) == 3
    assert metrics.registry.get_sample_value("secondstage_align_dead_letters") == 3

    # The next run reads the newer entries (refused once) again, never the dead-lettered ones; a duplicate stream
    # entry of a dead-lettered record (at-least-once logging) is skipped and acknowledged too.
    dead = json.loads(client.hget(keys.align_dead_letters, f"feedback:{old[0]}") or b"{}")
    entry = client.xrange(keys.feedback, min="-", max="+", count=1)[0][1]
    client.xadd(keys.feedback, entry)
    gate.passed = True
    third = run_once(settings, console=QUIET, client=client)
    assert third.status == "published", third.message
    assert sorted(trained[2]) == sorted(newer)
    assert third.counts["skipped_dead_lettered"] == 1
    assert pending(client, keys) == 0
    # Published: the refusal counts of what the version consumed are gone; the dead letters stay.
    assert client.hlen(keys.align_refusals) == 0 and client.hlen(keys.align_dead_letters) == 3

    # What the operator sees: each dead letter with the runs that refused it and why.
    assert dead["id"] == old[0] and dead["count"] == 2
    assert [r["run"] for r in dead["refusals"]] == [first.run_id, second.run_id]
    assert all(r["failed"] == ["heldout_accuracy"] for r in dead["refusals"])


def test_operators_see_refused_and_dead_lettered_entries(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, gate: FakeGate
) -> None:
    settings = settings.model_copy(update={"max_refusals": 2, "min_feedback": 1, "policies_dir": POLICIES})
    fake_trainer(monkeypatch)
    old = corrections(server, 2, tag="old")
    run_once(settings, console=QUIET, client=client)
    newer = corrections(server, 1, tag="new")
    second = run_once(settings, console=QUIET, client=client)
    monkeypatch.setenv("SECONDSTAGE_REDIS_URL", settings.redis_url or "")
    monkeypatch.setenv("SECONDSTAGE_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("SECONDSTAGE_MAX_REFUSALS", "2")

    shown = CliRunner().invoke(align_app, ["refusals", "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["max_refusals"] == 2
    assert [(e["id"], e["count"]) for e in report["refused"]] == [(newer[0], 1)]
    assert sorted(e["id"] for e in report["dead_lettered"]) == sorted(old)
    assert all(e["refusals"][-1]["run"] == second.run_id for e in report["dead_lettered"])

    text = CliRunner().invoke(align_app, ["refusals"])
    assert text.exit_code == 0, text.output
    assert newer[0] in text.output and old[0] in text.output and "heldout_accuracy" in text.output


def test_feedback_a_published_version_consumed_is_never_retrained_refused_before_or_not(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, gate: FakeGate
) -> None:
    keys = Keys(settings.redis_prefix)
    settings = settings.model_copy(update={"max_refusals": 3, "min_feedback": 1, "policies_dir": POLICIES})
    trained = fake_trainer(monkeypatch)
    first_ids = corrections(server, 3, tag="first")
    assert run_once(settings, console=QUIET, client=client).status == "gate_failed"
    gate.passed = True
    published = run_once(settings, console=QUIET, client=client)
    assert published.status == "published" and sorted(trained[1]) == sorted(first_ids)
    assert client.hlen(keys.align_refusals) == 0

    # Later runs, refused or not, never read them again — not even as refused entries.
    gate.passed = False
    later = corrections(server, 2, tag="later")
    for _ in range(2):
        result = run_once(settings, console=QUIET, client=client)
        assert result.status == "gate_failed"
    assert all(sorted(ids) == sorted(later) for ids in trained[2:])
    assert not set(first_ids) & {k.decode().split(":", 1)[1] for k in client.hkeys(keys.align_refusals)}


def test_entries_already_refused_max_refusals_times_are_dead_lettered_when_read(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, gate: FakeGate
) -> None:
    """An operator who lowers max_refusals takes entries already refused that often out at the next read (as
    does a run after one that died between counting and dead-lettering); a dry run only looks."""
    keys = Keys(settings.redis_prefix)
    settings = settings.model_copy(update={"max_refusals": 3, "min_feedback": 1, "policies_dir": POLICIES})
    fake_trainer(monkeypatch)
    ids = corrections(server, 3)
    for _ in range(2):
        assert run_once(settings, console=QUIET, client=client).status == "gate_failed"
    assert pending(client, keys) == len(ids) and client.hlen(keys.align_dead_letters) == 0

    lowered = settings.model_copy(update={"max_refusals": 2})
    dry = run_once(lowered, dry_run=True, console=QUIET, client=client)
    assert dry.counts["skipped_dead_lettered"] == len(ids) and pending(client, keys) == len(ids)
    gate.passed = True
    result = run_once(lowered, console=QUIET, client=client)
    assert result.status == "insufficient" and result.entries == {"refused": 0, "dead_lettered": len(ids)}
    assert pending(client, keys) == 0 and client.hlen(keys.align_dead_letters) == len(ids)
    assert client.hlen(keys.align_refusals) == 0
