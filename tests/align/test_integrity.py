"""Feedback integrity in align, on a real redis-server: what reaches a training row, and what is never trained twice.

- A correction holding a secret or an e-mail address never appears in a training row: the rows the real job
  hands to training (and `feedback export` writes) are checked against the repository's own rule files.
  The feedback is written straight to Redis, as an older server or one with other rules would have stored it.
- Feedback a published version trained on is not trained again, even when the run that published it died
  before it acknowledged: in-process here (the acknowledgement raises), and with a real `secondstage align run`
  process SIGKILLed at that point in the slow test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rich.console import Console
from typer.testing import CliRunner

import align.job
from align.cli import feedback_app
from align.feedback import FeedbackReader
from align.job import AlignError, run_once
from align.settings import AlignSettings
from core.keys import Keys
from core.versions import Manifest, Registry, VersionStore

from .conftest import Server
from .test_job import CORRECTIONS, pending, seed_corrections

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"

PRIVATE_KEY_BODY = "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu"
SECRETS = {
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "email": "jane.doe@example.com",
    "github": "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB",
    "private_key": PRIVATE_KEY_BODY,
}
LEAKY_CORRECTIONS = {
    "How do I log in to AWS?": f"Use aws_access_key_id = {SECRETS['aws']} in ~/.aws/credentials.",
    "Who do I write to?": f"Write to {SECRETS['email']} and wait for an answer.",
    "How do I clone it?": f"Clone it with the token {SECRETS['github']} as the password.",
    "What is the server key?": (
        "It is:\n-----BEGIN RSA PRIVATE KEY-----\n"
        f"{PRIVATE_KEY_BODY}\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\n"
        "-----END RSA PRIVATE KEY-----\nKeep it safe."
    ),
}


class Captured(Exception):
    """Raised by the fake trainer once it has the rows: the run stops there, nothing is published."""


def capture_rows(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Make the job's training step record the dataset it was given (the rows TRL would train on)."""
    seen: dict[str, Any] = {}

    def fake_train(settings: AlignSettings, data: Any, work_dir: Path, **kw: Any) -> Any:
        seen["data"] = data
        raise Captured

    monkeypatch.setattr(align.job, "_train", fake_train)
    return seen


def seed_leaky(server: Server) -> list[str]:
    ids = []
    for prompt, correction in LEAKY_CORRECTIONS.items():
        cid = server.completion(prompt, "I don't know.")
        ids.append(server.feedback(cid, thumbs="down", correction=correction))
    return ids


def assert_no_secret(text: str) -> None:
    for name, secret in SECRETS.items():
        assert secret not in text, f"{name} reached a training row"


def test_a_correction_containing_a_secret_never_appears_in_a_training_row(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.model_copy(update={"policies_dir": POLICIES})
    seed_leaky(server)
    seen = capture_rows(monkeypatch)
    with pytest.raises(Captured):
        run_once(settings, console=QUIET, client=client)
    data = seen["data"]
    rows = json.dumps([*data.dpo_rows, *data.kto_rows], ensure_ascii=False)
    assert_no_secret(rows)
    chosen = sorted(row["chosen"][0]["content"] for row in data.dpo_rows)
    assert chosen == sorted(
        [
            "Use aws_access_key_id = [SECRET] in ~/.aws/credentials.",
            "Write to [EMAIL] and wait for an answer.",
            "Clone it with the token [SECRET] as the password.",
            "It is:\n[PRIVATE KEY]\nKeep it safe.",
        ]
    )
    assert data.counts["correction_redacted"] == len(LEAKY_CORRECTIONS)
    # Each thumbs-down came with a correction: its (redacted) DPO pair stands for it, no KTO row beside it.
    assert data.kto_rows == [] and data.counts["kto_covered_by_correction"] == len(LEAKY_CORRECTIONS)


def test_feedback_export_writes_no_secret(
    settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_leaky(server)
    for name, value in {
        "REDIS_URL": settings.redis_url or "",
        "VAR_DIR": str(settings.var_dir),
        "MODEL": settings.model_path,
        "POLICIES_DIR": str(POLICIES),
    }.items():
        monkeypatch.setenv(f"SECONDSTAGE_{name}", value)
    out = settings.var_dir / "export"
    result = CliRunner().invoke(feedback_app, ["export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    dpo = (out / "dpo.jsonl").read_text()
    assert dpo.count("\n") == len(LEAKY_CORRECTIONS) and "[SECRET]" in dpo
    assert_no_secret(dpo + (out / "kto.jsonl").read_text())


def test_a_correction_a_block_rule_stops_is_left_out_and_its_thumbs_kept(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rules = tmp_path / "policies"
    shutil.copytree(POLICIES, rules)
    (rules / "zz-test.yaml").write_text(
        textwrap.dedent(
            """
            version: 1
            rules:
              - id: test.codename
                description: A project name that may never be taught to the model (added after serve took it).
                kind: keywords
                keywords: [project nightjar]
                stages: [output]
                action: block
            """
        )
    )
    settings = settings.model_copy(update={"policies_dir": rules, "min_feedback": 1})
    cid = server.completion("What are we building?", "A bird feeder.")
    server.feedback(cid, thumbs="down", correction="Project Nightjar, the new satellite.")
    seen = capture_rows(monkeypatch)
    with pytest.raises(Captured):
        run_once(settings, console=QUIET, client=client)
    data = seen["data"]
    assert data.dpo_rows == [] and len(data.kto_rows) == 1
    assert "Nightjar" not in json.dumps(data.kto_rows)
    assert data.counts["skipped_correction_blocked"] == 1


def test_a_run_without_readable_policies_fails_before_reading(
    client: redis.Redis, settings: AlignSettings, server: Server, tmp_path: Path
) -> None:
    seed_corrections(server)
    settings = settings.model_copy(update={"policies_dir": tmp_path / "nowhere"})
    with pytest.raises(AlignError, match="SECONDSTAGE_POLICIES_DIR"):
        run_once(settings, console=QUIET, client=client)
    assert pending(client, Keys(settings.redis_prefix)) == 0  # nothing was even delivered


# --- never trained twice ------------------------------------------------------------------------------------


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


def test_feedback_of_a_version_published_but_not_acknowledged_is_not_trained_again(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(settings.redis_prefix)
    settings = settings.model_copy(update={"gate_enabled": False, "policies_dir": POLICIES})
    first_ids = seed_corrections(server)
    trained = fake_trainer(monkeypatch)

    def killed(self: FeedbackReader, batch: Any) -> int:
        raise KeyboardInterrupt  # the process dies between publishing and acknowledging

    with monkeypatch.context() as m:
        m.setattr(FeedbackReader, "ack", killed)
        with pytest.raises(KeyboardInterrupt):
            run_once(settings, console=QUIET, client=client)
    registry = Registry(client, keys)
    # Published = registered (whether it is then active for everyone or a canary is the publish step's choice).
    assert sorted(registry.manifests()["v1"].feedback_ids) == sorted(first_ids)
    assert pending(client, keys) == len(first_ids)  # published, never acknowledged

    # What a dry run and an export would train on already leaves them out.
    dry = run_once(settings, dry_run=True, console=QUIET, client=client)
    assert dry.counts["skipped_already_trained"] == len(first_ids) and dry.counts["dpo"] == 0

    # The next run skips them, acknowledges them, and has nothing to train.
    again = run_once(settings, console=QUIET, client=client)
    assert again.status == "insufficient", again.message
    assert again.counts["skipped_already_trained"] == len(first_ids)
    assert pending(client, keys) == 0
    assert list(registry.manifests()) == ["v1"]

    # New feedback trains v2 on the new ids only.
    new_ids = [
        server.feedback(server.completion(prompt, f"Wrong {i}."), correction=right)
        for i, (prompt, (_, right)) in enumerate(CORRECTIONS.items())
    ]
    third = run_once(settings, console=QUIET, client=client)
    assert third.status == "published" and third.version == "v2", third.message
    assert sorted(registry.manifests()["v2"].feedback_ids) == sorted(new_ids)
    assert [sorted(ids) for ids in trained] == [sorted(first_ids), sorted(new_ids)]
    assert pending(client, keys) == 0

    # `--all` is the operator asking to retrain on everything: it skips nothing.
    everything = run_once(settings, all_feedback=True, dry_run=True, console=QUIET, client=client)
    assert everything.counts["dpo"] == len(first_ids) + len(new_ids)


def test_feedback_a_published_version_held_out_is_not_trained_later(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    """Held-out feedback evaluated a version: after a kill before the acknowledgement it must not train later."""
    keys = Keys(settings.redis_prefix)
    settings = settings.model_copy(update={"gate_enabled": False, "policies_dir": POLICIES})
    ids = seed_corrections(server)
    held, rest = ids[:2], ids[2:]
    Registry(client, keys).register(
        Manifest(version="v1", base_model="demo", feedback_ids=[], gate={"heldout_feedback_ids": held})
    )
    dry = run_once(settings, dry_run=True, console=QUIET, client=client)
    assert dry.counts["skipped_already_trained"] == len(held)
    assert dry.counts["dpo"] == len(rest)


# Runs `secondstage align run` (core.cli's app) with one change: the acknowledgement after publishing SIGKILLs
# the process instead. A kill from outside could not be timed to land between the two (they are microseconds
# apart); this is the same signal at exactly that point, and no test hook lives in the product's code.
KILL_AT_ACK = """
import os, signal, sys
import align.feedback
align.feedback.FeedbackReader.ack = lambda self, batch: os.kill(os.getpid(), signal.SIGKILL)
from core.cli import app
sys.argv = ["secondstage", "align", "run"]
app()
"""


@pytest.mark.slow
def test_align_killed_between_publish_and_acknowledge_does_not_retrain_that_feedback(
    client: redis.Redis, train_settings: AlignSettings, server: Server
) -> None:
    settings = train_settings
    keys = Keys(settings.redis_prefix)
    env = {
        **os.environ,
        "SECONDSTAGE_REDIS_URL": settings.redis_url or "",
        "SECONDSTAGE_VAR_DIR": str(settings.var_dir),
        "SECONDSTAGE_MODEL": settings.model_path,
        "SECONDSTAGE_LEARNING_RATE": str(settings.learning_rate),
        "SECONDSTAGE_EPOCHS": str(settings.epochs),
        "SECONDSTAGE_POLICIES_DIR": str(POLICIES),
        "SECONDSTAGE_LOCK_TTL_S": "10",  # the killed run cannot release its lock: let it expire soon
        # As train_settings: nothing held out (random completion ids would split unpredictably), the steps
        # the epochs give.
        "SECONDSTAGE_HELDOUT_SHARE": str(settings.heldout_share),
        "SECONDSTAGE_MIN_DPO_STEPS": str(settings.min_dpo_steps),
    }
    first_ids = seed_corrections(server)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_ACK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    registry = Registry(client, keys)
    assert "v1" in registry.manifests(), killed.stderr[-3000:]  # published (registered)
    assert sorted(registry.manifests()["v1"].feedback_ids) == sorted(first_ids)
    assert pending(client, keys) == len(first_ids)  # published, never acknowledged

    # The dead run's lock expires (lock_ttl_s); only then can another run start.
    deadline = time.monotonic() + 120
    while client.exists(keys.align_lock) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not client.exists(keys.align_lock)

    new_ids = [
        server.feedback(server.completion(prompt, f"Wrong answer {i}."), thumbs="down", correction=right)
        for i, (prompt, (_, right)) in enumerate(CORRECTIONS.items())
    ]
    second = subprocess.run(
        [sys.executable, "-m", "core.cli", "align", "run", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout)
    assert report["outcome"] == "published" and report["version"] == "v2", report
    assert report["rows"]["skipped_already_trained"] == len(first_ids)
    v1, v2 = registry.manifests()["v1"], registry.manifests()["v2"]
    assert sorted(v2.feedback_ids) == sorted(new_ids)
    assert not set(v1.feedback_ids) & set(v2.feedback_ids)  # no feedback id trained twice
    assert VersionStore(settings.versions_dir).names() == ["v1", "v2"]
    assert pending(client, keys) == 0


def test_a_run_that_cannot_read_every_manifest_refuses_rather_than_retrain(
    client: redis.Redis, settings: AlignSettings, server: Server
) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    client.hset(keys.versions, "v1", b'{"version": "v1"}')  # no base_model: which feedback it used is unknown
    with pytest.raises(AlignError, match="does not decode"):
        run_once(settings.model_copy(update={"policies_dir": POLICIES}), console=QUIET, client=client)
    assert client.hlen(keys.versions) == 1 and client.get(keys.active_version) is None
