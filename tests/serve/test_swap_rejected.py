"""A version name from Redis is checked before it is loaded: format, registry, path under the versions root.

Whatever name the active-version key holds, the server activates only `base` or a registered v<number>
whose directory is under the versions root; anything else is logged, counted as
`secondstage_swaps_total{result="rejected"}`, and the server keeps serving what it had.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.versions import Manifest, Registry, VersionError, VersionStore, check_name
from serve.settings import ServeSettings

MSG = [{"role": "user", "content": "hi"}]


def _rejected(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('secondstage_swaps_total{result="rejected"}'):
            return float(line.split()[-1])
    return 0.0


def _served_version(client: TestClient) -> str:
    return str(client.post("/v1/chat/completions", json={"messages": MSG}).json()["system_fingerprint"])


@pytest.mark.parametrize("name", ["../../etc", "v99", "v1/../../x", "/etc/passwd", "V1", "v1 ", ""])
def test_a_bad_or_unregistered_name_in_redis_is_rejected_and_the_server_keeps_its_version(
    client: TestClient, settings: ServeSettings, tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    rc = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    rc.set(keys.active_version, name)
    deadline = time.monotonic() + 5
    while _rejected(client) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rejected(client) == 1
    assert _served_version(client) == "base"
    assert any("refusing to activate version" in r.getMessage() for r in caplog.records)
    time.sleep(0.5)  # reconciled again meanwhile (every 0.2 s): refused once, not counted every tick
    assert _rejected(client) == 1


def test_a_registered_version_is_still_activated(client: TestClient, settings: ServeSettings, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    store = VersionStore(settings.versions_dir)
    store.write(Manifest(version="v1", base_model="demo"), adapter)
    Registry(redis.Redis.from_url(settings.redis_url), Keys(settings.redis_prefix)).register(store.manifest("v1"))
    redis.Redis.from_url(settings.redis_url).set(Keys(settings.redis_prefix).active_version, "v1")
    deadline = time.monotonic() + 5
    while _served_version(client) != "v1" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _served_version(client) == "v1" and _rejected(client) == 0


def test_version_names_and_paths_are_checked(tmp_path: Path) -> None:
    assert check_name("base") == "base" and check_name("v12") == "v12"
    for bad in ("../../etc", "v1/..", "v", "v1a", "x"):
        with pytest.raises(VersionError, match="v<number>"):
            check_name(bad)
    root = tmp_path / "versions"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "v7").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(VersionError, match="outside the versions root"):
        VersionStore(root).path("v7")
    assert VersionStore(root).path("v3") == (root / "v3").resolve()
