"""A gated version becomes a canary, and the next run trains from the promoted version, never from a canary.

Training and the gate are replaced by fakes (the real ones run in test_job.py); Redis is real.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rich.console import Console

import align.job
from align.job import run_once
from align.settings import AlignSettings
from core.canary import Rollout
from core.keys import Keys
from core.versions import BASE, Registry

from .conftest import Server
from .test_job import seed_corrections

QUIET = Console(quiet=True)


@pytest.fixture
def parents(monkeypatch: pytest.MonkeyPatch) -> list[Path | None]:
    """Fake training: an adapter directory, and the parent adapter each run continued from."""
    seen: list[Path | None] = []

    def fake_train(
        settings: AlignSettings, data: Any, work_dir: Path, *, parent_adapter: Path | None, **kw: Any
    ) -> Any:
        seen.append(parent_adapter)
        adapter = work_dir / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        return SimpleNamespace(adapter_dir=adapter, metrics={"loss": 1.0}, lora_rank=8)

    monkeypatch.setattr(align.job, "_train", fake_train)
    monkeypatch.setattr(align.job, "evaluate_gate", lambda *a, **kw: {"passed": True, "failed": [], "checks": {}})
    return seen


def test_published_versions_are_canaries_and_training_starts_from_the_promoted_one(
    client: redis.Redis, settings: AlignSettings, server: Server, parents: list[Path | None]
) -> None:
    keys = Keys(settings.redis_prefix)
    registry, rollout = Registry(client, keys), Rollout(client, keys)
    events = client.pubsub()
    events.subscribe(keys.events)
    events.get_message(timeout=5)

    seed_corrections(server)
    first = run_once(settings.model_copy(update={"canary_share": 0.3}), console=QUIET, client=client)
    assert first.status == "published" and "as a canary for 30% of callers" in first.message
    state = rollout.state()
    assert state is not None and (state.version, state.incumbent, state.share) == ("v1", BASE, 0.3)
    assert registry.active() == BASE  # not promoted: everyone else keeps the base model
    message = events.get_message(timeout=5)
    assert message is not None and json.loads(message["data"])["type"] == "canary_started"
    assert rollout.history("v1")[0]["trigger"] == "align"

    # v1 is still a canary: the next run trains from the promoted version (base), not from v1.
    seed_corrections(server)
    second = run_once(settings, console=QUIET, client=client)
    assert second.version == "v2" and second.parent == BASE and parents[-1] is None
    assert rollout.state().version == "v2"  # type: ignore[union-attr]
    assert [e["type"] for e in rollout.history("v1")] == ["canary_started", "superseded"]

    # Once v2 is promoted, the next one trains from v2's adapter.
    rollout.promote("v2")
    seed_corrections(server)
    third = run_once(settings, console=QUIET, client=client)
    assert third.version == "v3" and third.parent == "v2"
    assert parents[-1] is not None and parents[-1].parent.name == "v2"


def test_canary_mode_off_activates_at_once(
    client: redis.Redis, settings: AlignSettings, server: Server, parents: list[Path | None]
) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    result = run_once(settings.model_copy(update={"canary_enabled": False}), console=QUIET, client=client)
    assert result.status == "published" and "for everyone" in result.message
    assert Registry(client, keys).active() == "v1" and Rollout(client, keys).state() is None
