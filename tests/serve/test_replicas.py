"""Replicas on one Redis, piece by piece: a spool each, version skew with backoff, feedback that reaches
a replica before the completion's record does, policy reloads fanned out, ConfigMap symlink swaps.

The whole fleet (two real `serve` processes, a Redis restart, a replica killed mid-stream) is
tests/e2e/test_replicas.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from core.cli import app as root_app
from core.cli import mount_commands
from core.keys import Keys
from core.policy import PolicyEngine
from core.redis_server import PrivateRedis
from core.versions import BASE
from serve.app import build_app
from serve.logwriter import Record
from serve.logwriter.spool import Spool
from serve.policy.fanout import PolicyFanout
from serve.services.records import UNCHECKED, Recorder, completion_id_time, new_completion_id
from serve.settings import ServeSettings
from serve.swap import VersionWatcher
from tests.fakes import FakeLLM, fake_engine
from tests.serve.test_swap import _publish

MSG = [{"role": "user", "content": "hi"}]

RULE = """\
version: 1
rules:
  - id: {rule_id}
    description: a word
    kind: keywords
    keywords: [zebra]
    stages: [input]
    action: block
"""


# --- a spool per replica ------------------------------------------------------------------------------


def test_two_replicas_share_one_var_directory_each_with_its_own_spool(settings: ServeSettings) -> None:
    a = settings.model_copy(update={"replica_name": "serve-0"})
    b = settings.model_copy(update={"replica_name": "serve-1"})
    with (
        TestClient(build_app(a, engine=fake_engine(FakeLLM(), a))) as ca,
        TestClient(build_app(b, engine=fake_engine(FakeLLM(), b))) as cb,
    ):
        assert ca.get("/health").json()["replica"] == "serve-0"
        assert cb.get("/health").json()["replica"] == "serve-1"
    assert (settings.var_dir / "spool" / "serve-0" / "lock").is_file()
    assert (settings.var_dir / "spool" / "serve-1" / "lock").is_file()


def test_a_second_replica_with_the_same_name_is_refused(settings: ServeSettings) -> None:
    a = settings.model_copy(update={"replica_name": "serve-0"})
    with (
        TestClient(build_app(a, engine=fake_engine(FakeLLM(), a))),
        pytest.raises(RuntimeError, match="in use by another LogWriter"),
        TestClient(build_app(a, engine=fake_engine(FakeLLM(), a))),
    ):
        pass


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "-x"])
def test_a_replica_name_must_be_a_directory_name(name: str) -> None:
    with pytest.raises(ValueError, match="replica_name"):
        ServeSettings(replica_name=name)


def test_the_replica_name_defaults_to_the_hostname() -> None:
    import socket

    assert ServeSettings().replica_name == socket.gethostname()


def _spool_records(directory: Path, keys: Keys, ids: list[str]) -> None:
    spool = Spool(directory)
    spool.append(
        [Record(stream=keys.completions, fields={"id": i}, index_key=keys.completion(i), index_value="{}") for i in ids]
    )
    spool.close()


def _cli(monkeypatch: pytest.MonkeyPatch, settings: ServeSettings, *args: str) -> tuple[int, str]:
    monkeypatch.setenv("SECONDSTAGE_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("SECONDSTAGE_REDIS_URL", str(settings.redis_url))
    if not any(g.name == "policy" for g in root_app.registered_groups):
        mount_commands(root_app)
    result = CliRunner().invoke(root_app, list(args))
    return result.exit_code, result.output


def test_replay_spool_writes_a_dead_replicas_records(monkeypatch: pytest.MonkeyPatch, settings: ServeSettings) -> None:
    keys = Keys(settings.redis_prefix)
    ids = [new_completion_id("chatcmpl") for _ in range(3)]
    _spool_records(settings.var_dir / "spool" / "serve-2", keys, ids)
    code, out = _cli(monkeypatch, settings, "data", "replay-spool")
    assert code == 0 and "serve-2" in out, out
    code, out = _cli(monkeypatch, settings, "data", "replay-spool", "--replica", "serve-2")
    assert code == 0, out
    rc = redis.Redis.from_url(str(settings.redis_url))
    assert all(rc.exists(keys.completion(i)) for i in ids)
    assert rc.xlen(keys.completions) == 3
    assert not list((settings.var_dir / "spool" / "serve-2").glob("replay-*.jsonl"))


def test_a_spool_from_before_replica_names_is_reported_and_replays_with_dir(
    monkeypatch: pytest.MonkeyPatch, settings: ServeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    keys = Keys(settings.redis_prefix)
    legacy = settings.var_dir / "spool"
    ids = [new_completion_id("chatcmpl")]
    _spool_records(legacy, keys, ids)
    with TestClient(build_app(settings, engine=fake_engine(FakeLLM(), settings))):
        pass
    assert any("replay-spool --dir" in r.getMessage() for r in caplog.records)
    code, out = _cli(monkeypatch, settings, "data", "replay-spool", "--dir", str(legacy))
    assert code == 0, out
    assert redis.Redis.from_url(str(settings.redis_url)).exists(keys.completion(ids[0]))


def test_replay_spool_refuses_a_running_replicas_spool(
    monkeypatch: pytest.MonkeyPatch, settings: ServeSettings
) -> None:
    live = Spool(settings.var_dir / "spool" / "serve-0")
    live.lock()
    try:
        code, out = _cli(monkeypatch, settings, "data", "replay-spool", "--replica", "serve-0")
    finally:
        live.unlock()
    assert code == 1 and "in use by another LogWriter" in out


# --- version skew ---------------------------------------------------------------------------------------


def _skew_metric(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("secondstage_version_skew "):
            return float(line.split()[-1])
    raise AssertionError("no secondstage_version_skew")


def test_a_replica_that_cannot_load_the_active_version_reports_skew_and_recovers(
    settings: ServeSettings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"version_retry_max_s": 0.3})
    llm = FakeLLM()
    llm.fail_lora = True
    with TestClient(build_app(settings, engine=fake_engine(llm, settings))) as client:
        assert client.get("/health").json()["skew"] is False and _skew_metric(client) == 0
        _publish(settings, "v1", tmp_path)
        deadline = time.monotonic() + 5
        while not client.get("/health").json()["skew"]:
            assert time.monotonic() < deadline, "skew never reported"
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 200
        body = health.json()
        assert body["status"] == "degraded" and body["version"] == BASE and body["wanted"] == "v1"
        assert "v1" in body["reason"]
        card = client.get("/v1/models").json()["data"][0]
        assert card["version"] == BASE and card["wanted_version"] == "v1"
        assert _skew_metric(client) == 1
        llm.fail_lora = False  # the next retry (backoff, no event) loads it
        deadline = time.monotonic() + 5
        while client.get("/health").json()["skew"]:
            assert time.monotonic() < deadline, "never retried"
            time.sleep(0.05)
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/v1/models").json()["data"][0]["wanted_version"] == "v1"
        assert _skew_metric(client) == 0


class _BrokenEngine:
    """Enough of ModelEngine for the watcher: every activation fails."""

    def __init__(self) -> None:
        self.current = type("Served", (), {"name": BASE})()
        self.canary = None
        self.attempts = 0

    async def activate(self, name: str) -> float:
        self.attempts += 1
        raise OSError(f"cannot load {name}")

    def reject_version(self, name: str, reason: str) -> None:
        raise AssertionError("not refused: it is registered")


async def test_failed_loads_are_retried_with_capped_exponential_backoff(redis_server: PrivateRedis) -> None:
    keys = Keys()
    sync = redis.Redis.from_url(redis_server.url)
    sync.hset(keys.versions, "v1", "{}")
    sync.set(keys.active_version, "v1")
    engine = _BrokenEngine()
    client = aioredis.Redis.from_url(redis_server.url)
    watcher = VersionWatcher(engine, lambda: client, keys, retry_initial_s=0.1, retry_max_s=0.4)  # type: ignore[arg-type]
    try:
        start = time.monotonic()
        while time.monotonic() - start < 1.6:  # a reconcile every 10 ms: a hot loop would try ~160 times
            await watcher.reconcile(client)
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()
    # Tries at 0, 0.1, 0.3, 0.7, 1.1, 1.5 s (delays 0.1, 0.2, 0.4, then capped at 0.4).
    assert 5 <= engine.attempts <= 7, engine.attempts
    assert watcher.skew and watcher.wanted == "v1"
    watcher.retry_now()  # an activation event: tried at once
    await watcher.reconcile(aioredis.Redis.from_url(redis_server.url))
    assert engine.attempts >= 6


# --- feedback for a completion another replica made -----------------------------------------------------


def test_completion_ids_tell_their_time() -> None:
    now = time.time()
    cid = new_completion_id("chatcmpl", now)
    assert cid.startswith("chatcmpl-") and len(cid) == len("chatcmpl-") + 32
    made = completion_id_time(cid)
    assert made is not None and abs(made - now) < 0.002
    assert completion_id_time(f"{cid}-3") == made  # /v1/completions: one record per prompt
    assert uuid.UUID(cid.removeprefix("chatcmpl-")).version == 7
    assert completion_id_time(f"chatcmpl-{uuid.uuid4().hex}") is None  # ids made before this format
    assert completion_id_time("nonsense") is None
    assert new_completion_id("chatcmpl") != new_completion_id("chatcmpl")


class _NothingPending:
    def submit(self, record: object) -> None:
        raise AssertionError("not written")

    def is_pending(self, index_key: str) -> bool:
        return False


async def test_an_unknown_recent_id_is_unverified_and_an_old_one_unknown(redis_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(redis_server.url)
    recorder = Recorder(_NothingPending(), client, Keys(), record_cls=Record, unverified_window_s=60)
    try:
        assert await recorder.lookup(new_completion_id("chatcmpl")) is UNCHECKED
        assert await recorder.lookup(new_completion_id("chatcmpl", time.time() - 120)) is None
        assert await recorder.lookup(new_completion_id("chatcmpl", time.time() + 3600)) is None
        assert await recorder.lookup(f"chatcmpl-{uuid.uuid4().hex}") is None
        recorder.unverified_window_s = 0
        assert await recorder.lookup(new_completion_id("chatcmpl")) is None
    finally:
        await client.aclose()


def test_feedback_on_another_replicas_fresh_completion_is_accepted(client: TestClient) -> None:
    fresh = new_completion_id("chatcmpl")  # made "elsewhere" a moment ago; its record is not in Redis yet
    r = client.post("/v1/feedback", json={"completion_id": fresh, "thumbs": "up"})
    assert r.status_code == 200, r.text
    old = new_completion_id("chatcmpl", time.time() - 3600)
    r = client.post("/v1/feedback", json={"completion_id": old, "thumbs": "up"})
    assert r.status_code == 404


# --- policy reloads -------------------------------------------------------------------------------------


def _policy_dir(root: Path, rule_id: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "rules.yaml").write_text(RULE.format(rule_id=rule_id))
    return root


async def test_a_reload_on_one_replica_reaches_the_others(redis_server: PrivateRedis, tmp_path: Path) -> None:
    engines = []
    for name in ("a", "b"):
        engine = PolicyEngine(_policy_dir(tmp_path / name, "one"), registry=CollectorRegistry())
        engine.load()
        engines.append(engine)
    a, b = engines
    fanouts = [
        PolicyFanout(e, lambda: aioredis.Redis.from_url(redis_server.url), Keys(), name)
        for e, name in ((a, "serve-0"), (b, "serve-1"))
    ]
    for f in fanouts:
        f.attach()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(f.run(stop)) for f in fanouts]
    try:
        await asyncio.sleep(0.3)  # subscribed
        for name in ("a", "b"):
            _policy_dir(tmp_path / name, "two")  # both replicas see the new files (a shared ConfigMap)
        result = await a.reload_off_loop(wait=False)
        assert result.changed and a.active.rules[0].id == "two"
        deadline = time.monotonic() + 10
        while b.active.rules[0].id != "two":
            assert time.monotonic() < deadline, "the reload never reached the other replica"
            await asyncio.sleep(0.05)
        assert b.active.version == a.active.version
        await asyncio.sleep(0.3)
        assert fanouts[0].received == 0 and fanouts[1].received == 1  # its own announcement is not echoed
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_the_file_watcher_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    """Kubernetes' ConfigMap update: new `..<ts>/` dir, `..data` renamed over, `rules.yaml` never touched."""
    root = tmp_path / "policies"
    first = _policy_dir(root / "..2026_01_01_00_00_00.1", "one")
    os.symlink(first.name, root / "..data")
    os.symlink("..data/rules.yaml", root / "rules.yaml")
    engine = PolicyEngine(root, registry=CollectorRegistry())
    engine.load()
    assert engine.active.rules[0].id == "one"
    stop = asyncio.Event()
    task = asyncio.create_task(engine.watch(stop, debounce_ms=50))
    try:
        await asyncio.sleep(0.5)  # watching
        second = _policy_dir(root / "..2026_01_01_00_01_00.2", "two")
        os.symlink(second.name, root / "..data_tmp")
        os.rename(root / "..data_tmp", root / "..data")  # atomic, as the kubelet does it
        deadline = time.monotonic() + 10
        while engine.active.rules[0].id != "two":
            assert time.monotonic() < deadline, "the ConfigMap swap did not reload the rules"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
