"""Under `accelerate launch` only rank 0 takes the lock, gates, publishes and acknowledges; the others only train.

The processes of a real multi-GPU launch cannot run here: each rank's path is exercised by setting the
environment the launcher sets (RANK, LOCAL_RANK), on a real redis-server, with training replaced by a fake.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from rich.console import Console

import align.job
from align.job import AlignError, align_lock, process_rank, run_once
from align.settings import AlignSettings
from core.keys import Keys

from .conftest import Server
from .test_job import pending, seed_corrections

QUIET = Console(quiet=True)


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "0", "LOCAL_RANK": "0"}, 0),
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),
        ({"RANK": "0", "LOCAL_RANK": "2"}, 0),  # global rank wins: LOCAL_RANK 2 of node 0 is not the main
        ({"RANK": "4", "LOCAL_RANK": "0"}, 4),  # node 1's first process is not the main one either
        ({"LOCAL_RANK": "2"}, 2),  # one node, only LOCAL_RANK set
        ({"RANK": " "}, 0),
    ],
)
def test_process_rank_from_the_launchers_environment(env: dict[str, str], rank: int) -> None:
    assert process_rank(env) == rank


def test_a_bad_rank_is_refused_naming_it() -> None:
    with pytest.raises(AlignError, match="RANK='x' is not a process rank"):
        process_rank({"RANK": "x"})


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace training with a fake that records where it ran; refuse any gate call."""
    calls: list[Path] = []

    def fake_train(settings: AlignSettings, data: Any, work_dir: Path, **kw: Any) -> Any:
        calls.append(work_dir)
        return SimpleNamespace(metrics={"loss": 1.0})

    def no_gate(*args: Any, **kw: Any) -> Any:
        raise AssertionError("a non-main rank must not gate")

    monkeypatch.setattr(align.job, "_train", fake_train)
    monkeypatch.setattr(align.job, "evaluate_gate", no_gate)
    return calls


def test_non_main_rank_trains_without_lock_gate_publish_or_ack(
    monkeypatch: pytest.MonkeyPatch,
    client: redis.Redis,
    settings: AlignSettings,
    server: Server,
    trained: list[Path],
) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    # The main process holds the lock while the others train: a worker must not need it (nor wait for it).
    main = align_lock(client, keys.align_lock, 60)
    assert main.acquire()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    result = run_once(settings, console=QUIET, client=client)
    assert result.status == "worker" and result.exit_code == 0, result.message
    assert len(trained) == 1 and "rank1" in trained[0].name
    assert result.counts["dpo"] == 5
    assert client.get(keys.align_lock) == main.local.token  # untouched
    assert client.get(keys.active_version) is None and client.hlen(keys.versions) == 0  # nothing published
    assert pending(client, keys) == 0  # nothing consumed: the main process's read sees every entry
    main.release()


def test_main_rank_still_takes_the_lock(
    monkeypatch: pytest.MonkeyPatch,
    client: redis.Redis,
    settings: AlignSettings,
    server: Server,
    trained: list[Path],
) -> None:
    keys = Keys(settings.redis_prefix)
    seed_corrections(server)
    other = align_lock(client, keys.align_lock, 60)
    assert other.acquire()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert run_once(settings, console=QUIET, client=client).status == "locked"
    assert trained == []
    other.release()


def test_non_main_rank_with_too_little_feedback_trains_nothing(
    monkeypatch: pytest.MonkeyPatch,
    client: redis.Redis,
    settings: AlignSettings,
    server: Server,
    trained: list[Path],
) -> None:
    cid = server.completion("Q?", "A.")
    server.feedback(cid, thumbs="up")
    monkeypatch.setenv("RANK", "2")
    assert run_once(settings, console=QUIET, client=client).status == "insufficient"
    assert trained == []
