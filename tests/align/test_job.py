"""The align job on a real redis-server: too little feedback, the lock, failures, and real training runs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import torch
from rich.console import Console
from safetensors.torch import load_file

import align.job
from align.job import align_lock, renewing, run_every, run_once
from align.settings import AlignSettings
from align.train import LORA_TARGETS
from core.canary import Rollout
from core.keys import Keys
from core.versions import Registry, VersionStore

from .conftest import Server

QUIET = Console(quiet=True)

CORRECTIONS = {
    "What colour is the sky?": ("Green.", "The sky is blue."),
    "What is the capital of France?": ("Cats.", "The capital of France is Paris."),
    "How hot is boiling water?": ("Blue.", "Water boils at one hundred degrees Celsius."),
    "Do cats sleep?": ("No.", "Cats sleep most of the day."),
    "Please answer politely.": ("You fool.", "Thank you for asking."),
}


def seed_corrections(server: Server) -> list[str]:
    ids = []
    for prompt, (answer, correction) in CORRECTIONS.items():
        cid = server.completion(prompt, answer)
        ids.append(server.feedback(cid, correction=correction))
    return ids


def pending(client: redis.Redis, keys: Keys) -> int:
    """Feedback entries delivered to the align group and not acknowledged (0 when there is no group yet)."""
    try:
        return int(client.xpending(keys.feedback, keys.align_group)["pending"])
    except redis.ResponseError:
        return 0


def test_too_little_feedback_publishes_nothing(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    keys = Keys(settings.redis_prefix)
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    server.feedback(cid, comment="no signal in a comment alone")
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "insufficient" and result.exit_code == 0
    assert "1 usable rows, need 4" in result.message
    assert client.get(keys.active_version) is None
    assert client.hlen(keys.versions) == 0
    assert not settings.versions_dir.exists()
    assert pending(client, keys) == 2  # nothing acknowledged: the rows count toward a later run
    assert client.get(keys.align_lock) is None  # the lock was released


def test_lock_held_refuses_a_second_run(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    other = align_lock(client, keys.align_lock, 60)
    assert other.acquire()
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "locked" and result.exit_code == 75
    assert keys.align_lock in result.message
    assert client.get(keys.align_lock) == other.local.token  # not released by the refused run
    assert pending(client, keys) == 0  # the feedback was not even read
    other.release()


def test_lock_is_renewed_while_the_run_works(client: redis.Redis) -> None:
    # A 2 s TTL renewed every ~0.67 s: a renewal thread starved for over a second on a loaded CI machine
    # must not read as a failure (a 0.6 s TTL did, once, at load average 14 on 2 cores).
    lock = client.lock("lock", timeout=2.0, blocking=False, thread_local=False)
    assert lock.acquire()
    with renewing(lock, QUIET):
        time.sleep(5.0)  # well past the TTL: without renewal the lock is gone
        assert lock.owned()
    lock.release()


def test_a_run_that_lost_its_lock_publishes_nothing(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(settings.redis_prefix)
    ids = seed_corrections(server)

    def trained_while_the_lock_expired(*args: object, **kwargs: object) -> SimpleNamespace:
        client.set(keys.align_lock, b"another run's token")  # expired and retaken by another run
        return SimpleNamespace(metrics={}, adapter_dir=Path("unused"), lora_rank=8)

    monkeypatch.setattr(align.job, "train_adapter", trained_while_the_lock_expired)
    with pytest.raises(align.job.AlignError, match="lost the align lock"):
        run_once(settings.model_copy(update={"gate_enabled": False}), console=QUIET, client=client)
    assert client.get(keys.align_lock) == b"another run's token"  # not ours to release
    assert client.get(keys.active_version) is None and client.hlen(keys.versions) == 0
    assert pending(client, keys) == len(ids)


def test_failed_training_acknowledges_nothing(
    client: redis.Redis, settings: AlignSettings, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(settings.redis_prefix)
    ids = seed_corrections(server)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(align.job, "train_adapter", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        run_once(settings, console=QUIET, client=client)
    assert pending(client, keys) == len(ids)
    assert client.get(keys.align_lock) is None
    assert client.get(keys.active_version) is None
    # The next run sees exactly the same feedback again.
    monkeypatch.undo()
    dry = run_once(settings, dry_run=True, console=QUIET, client=client)
    assert dry.status == "dry_run" and dry.counts["dpo"] == len(ids)
    assert pending(client, keys) == len(ids)


def test_dry_run_changes_nothing(client: redis.Redis, settings: AlignSettings, server: Server) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    result = run_once(settings, dry_run=True, console=QUIET, client=client)
    assert result.status == "dry_run" and result.counts["dpo_correction"] == len(CORRECTIONS)
    assert pending(client, keys) == 0  # not even delivered to the group
    assert client.get(keys.active_version) is None


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_training_run_publishes_a_version(client: redis.Redis, train_settings: AlignSettings, server: Server) -> None:
    settings = train_settings
    keys = Keys(settings.redis_prefix)
    fb_ids = seed_corrections(server)
    cid = server.completion("Do dogs like to walk?", "Dogs like to walk.")
    fb_ids.append(server.feedback(cid, thumbs="up"))
    cid = server.completion("What is the answer?", "You fool.")
    fb_ids.append(server.feedback(cid, thumbs="down"))
    cid = server.completion("Who are you?", "Nobody you need.")
    fb_ids.append(server.feedback(cid, thumbs="down"))
    pair_id = server.policy_pair("Say something rude.", "You fool.", "I would rather not.")

    events = client.pubsub()
    events.subscribe(keys.events)
    assert events.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]

    started = time.monotonic()
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "published", result.message
    assert result.version == "v1" and result.parent == "base"
    assert time.monotonic() - started < 300

    # The version directory: adapter + manifest with lineage, datasets, metrics and the gate.
    store = VersionStore(settings.versions_dir)
    assert store.names() == ["v1"]
    path = store.path("v1")
    assert (path / "adapter" / "adapter_config.json").is_file()
    assert not (path / "adapter" / "ref").exists()  # TRL's reference copy is not shipped
    manifest = store.manifest("v1")
    assert sorted(manifest.feedback_ids) == sorted(fb_ids)
    assert manifest.policy_pair_ids == [pair_id]
    assert manifest.datasets["dpo"] == len(CORRECTIONS) + 1 and manifest.datasets["kto"] == 3
    assert manifest.base_model == settings.model_path and manifest.lora_rank == settings.lora_rank
    assert manifest.gate["passed"] and manifest.gate["checks"]["margin_gain"]["value"] > 0
    assert manifest.metrics["dpo_steps"] > 0 and manifest.metrics["kto_steps"] > 0
    # liked_as_sft (default): the liked answer trains in the DPO phase; the two thumbs-downs are the KTO phase.
    assert manifest.metrics["sft_rows"] == 1 and manifest.metrics["kto_rows"] == 2
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == settings.lora_rank
    assert set(config["target_modules"]) == set(LORA_TARGETS)

    # Parameters moved: LoRA B starts at zero, so a trained adapter has every B non-zero.
    tensors = _adapter(path)
    b_mats = [t for k, t in tensors.items() if "lora_B" in k]
    assert b_mats and all(t.abs().sum() > 0 for t in b_mats)
    assert all(torch.isfinite(t).all() for t in tensors.values())

    # Registered, started as a canary (canary mode is the default), announced.
    registry = Registry(client, keys)
    rollout = Rollout(client, keys)
    assert list(registry.manifests()) == ["v1"] and rollout.state().version == "v1"  # type: ignore[union-attr]
    message = events.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["type"] == "canary_started"
    events.close()

    # Consumed: a second run has nothing new and publishes nothing.
    again = run_once(settings, console=QUIET, client=client)
    assert again.status == "insufficient"
    assert store.names() == ["v1"] and rollout.state().version == "v1"  # type: ignore[union-attr]

    # Promoted (here by hand), new feedback trains v2 from v1's adapter (iterative alignment); every tensor moves.
    rollout.promote("v1")
    assert registry.active() == "v1"
    for i, (prompt, (_, correction)) in enumerate(CORRECTIONS.items()):
        cid = server.completion(prompt, f"Wrong answer {i}.")
        server.feedback(cid, thumbs="down", correction=correction)
    second = run_once(settings, console=QUIET, client=client)
    assert second.status == "published", second.message
    assert second.version == "v2" and second.parent == "v1"
    assert store.manifest("v2").parent == "v1"
    v1, v2 = _adapter(path), _adapter(store.path("v2"))
    assert v1.keys() == v2.keys()
    assert all(not torch.equal(v1[k], v2[k]) for k in v1)
    assert rollout.state().version == "v2"  # type: ignore[union-attr]


@pytest.mark.slow
def test_gate_failure_publishes_nothing_and_keeps_feedback(
    client: redis.Redis, train_settings: AlignSettings, server: Server
) -> None:
    keys = Keys(train_settings.redis_prefix)
    settings = train_settings.model_copy(update={"gate_min_margin_gain": 1e9, "max_steps": 2})
    ids = seed_corrections(server)
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "gate_failed" and result.exit_code == 3
    assert result.gate["failed"] == ["margin_gain"]
    assert "margin_gain" in result.message
    assert not settings.versions_dir.exists() or VersionStore(settings.versions_dir).names() == []
    assert client.get(keys.active_version) is None
    assert pending(client, keys) == len(ids)
    # The refusal is counted against each entry (align/refusals.py); at max_refusals they leave training.
    assert result.entries == {"refused": len(ids), "dead_lettered": 0} and client.hlen(keys.align_refusals) == len(ids)
    again = run_once(settings.model_copy(update={"max_refusals": 2}), console=QUIET, client=client)
    assert again.status == "gate_failed" and again.entries == {"refused": len(ids), "dead_lettered": len(ids)}
    assert pending(client, keys) == 0 and client.hlen(keys.align_dead_letters) == len(ids)
    assert run_once(settings, console=QUIET, client=client).status == "insufficient"


def test_run_every_repeats_until_max_runs(settings: AlignSettings, server: Server) -> None:
    started = time.monotonic()
    results = run_every(settings, 0.2, console=QUIET, max_runs=3)
    assert [r.status for r in results] == ["insufficient"] * 3
    assert time.monotonic() - started >= 0.4  # it waited between runs


@pytest.mark.slow
def test_thumbs_only_trains_with_kto(client: redis.Redis, train_settings: AlignSettings, server: Server) -> None:
    for i, prompt in enumerate(CORRECTIONS):
        cid = server.completion(prompt, f"Answer {i}.")
        server.feedback(cid, thumbs="up" if i % 2 else "down")
    # Liked answers in the KTO phase too (not the default, which rehearses them in the DPO phase).
    settings = train_settings.model_copy(update={"liked_as_sft": False})
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "published", result.message
    assert result.counts["dpo"] == 0 and result.counts["kto"] == len(CORRECTIONS)
    assert "kto_signed_logp" in result.gate["checks"]["margin_gain"]["note"]
    assert result.metrics["kto_steps"] > 0 and "dpo_steps" not in result.metrics
