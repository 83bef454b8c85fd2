"""Tests for the private redis-server child and `resolve_redis` (also beside a running supervisor), against the
real `redis-server` binary."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.redis_server import SUPERVISOR_LOCK, PrivateRedis, RedisServerError, resolve_redis, supervisor_holder
from core.redis_supervisor import RedisSupervisor
from core.settings import CommonSettings


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    s = PrivateRedis(tmp_path / "redis")
    s.start()
    yield s
    s.stop()


def client(s: PrivateRedis) -> redis.Redis:
    return redis.Redis.from_url(s.url, decode_responses=True)


def test_start_serves_on_a_private_unix_socket_only(server: PrivateRedis) -> None:
    assert server.owned and server.ping()
    assert server.url == f"unix://:{server.password}@{server.socket_path}"
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o700
    with client(server) as c:
        config = c.config_get("*")
    assert config["port"] == "0"
    assert config["appendonly"] == "yes"
    assert config["appendfsync"] == "always"  # acknowledged = on disk: survives SIGKILL
    assert config["save"] == ""
    assert Path(config["dir"]) == server.data_dir
    assert int(server.pidfile.read_text()) == server.pid


def test_stop_shuts_down_and_data_survives(server: PrivateRedis) -> None:
    with client(server) as c:
        c.set("k", "v")
    server.stop()
    assert not server.ping() and not server.owned
    server.start()
    with client(server) as c:
        assert c.get("k") == "v"


def test_kill_then_restart_keeps_acknowledged_writes_through_the_aof(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis", appendfsync="always")
    server.start()
    with client(server) as c:
        for i in range(500):
            c.xadd("s", {"i": str(i)})
    server.kill()
    assert not server.ping()
    with client(server) as c, pytest.raises(redis.ConnectionError):
        c.ping()
    server.restart()
    with client(server) as c:
        assert c.xlen("s") == 500
    server.stop()


def test_second_start_on_the_same_dir_reuses_the_running_server(server: PrivateRedis) -> None:
    other = PrivateRedis(server.data_dir)
    other.start()
    assert not other.owned and other.pid is None
    other.stop()  # not ours: must leave it running
    assert server.ping()
    with pytest.raises(RedisServerError, match="not started by this object"):
        other.kill()


def test_context_manager_stops_the_child(tmp_path: Path) -> None:
    with PrivateRedis(tmp_path / "r") as s:
        assert s.ping()
        proc_pid = s.pid
    assert proc_pid is not None and not s.ping()


def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    s = PrivateRedis(tmp_path / "r", executable="no-such-redis-server-binary")
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        s.start()


def test_failed_start_reports_the_log(tmp_path: Path) -> None:
    # `false` exits at once: start must say so instead of waiting out the timeout.
    s = PrivateRedis(tmp_path / "r", executable="false")
    with pytest.raises(RedisServerError, match="exited with code 1"):
        s.start(timeout=5)


def test_socket_path_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RedisServerError, match="too deep"):
        PrivateRedis(tmp_path / ("d" * 120))


def test_resolve_redis_prefers_a_configured_url(tmp_path: Path) -> None:
    settings = CommonSettings(var_dir=tmp_path / "var", redis_url="redis://example:6379/0")
    assert resolve_redis(settings) == ("redis://example:6379/0", None)
    assert not (tmp_path / "var" / "redis").exists()


def test_resolve_redis_starts_then_shares_the_private_server(tmp_path: Path) -> None:
    settings = CommonSettings(var_dir=tmp_path / "var", redis_url=None)
    url, handle = resolve_redis(settings)
    try:
        assert handle is not None and handle.owned
        assert url == f"unix://:{handle.password}@{(tmp_path / 'var' / 'redis' / 'redis.sock').absolute()}"
        # align starting beside serve finds the same server and gets no handle to stop.
        url2, handle2 = resolve_redis(settings)
        assert (url2, handle2) == (url, None)
        with redis.Redis.from_url(url) as c:
            assert c.ping()
    finally:
        if handle is not None:
            handle.stop()
    assert not PrivateRedis(settings.redis_dir).ping()


def test_probe_tells_loading_from_down(tmp_path: Path) -> None:
    s = PrivateRedis(tmp_path / "r")
    assert s._probe() == "down"  # no socket yet
    s.start()
    try:
        assert s._probe() == "up"
    finally:
        s.stop()
    assert s._probe() == "down"  # a stale socket file does not answer


def _hold_supervisor_lock(data_dir: Path) -> int:
    """Take the lock as a running `secondstage serve` would (the flock is per open file, so this process counts)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / SUPERVISOR_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242")
    return fd


def test_resolve_redis_never_starts_a_second_server_on_a_supervised_directory(tmp_path: Path) -> None:
    settings = CommonSettings(var_dir=tmp_path / "var", redis_url=None, redis_wait_s=0.5)
    fd = _hold_supervisor_lock(settings.redis_dir)
    try:
        assert supervisor_holder(settings.redis_dir) == "pid 4242"
        with pytest.raises(RedisServerError) as info:
            resolve_redis(settings)
        message = str(info.value)
        assert str(settings.redis_dir.absolute()) in message
        assert "secondstage serve (pid 4242) supervises it" in message
        assert "will not start a second redis-server" in message
        assert not PrivateRedis(settings.redis_dir).ping()
    finally:
        os.close(fd)
    assert supervisor_holder(settings.redis_dir) is None
    _, handle = resolve_redis(settings)  # serve gone: start our own, as without serve
    assert handle is not None and handle.owned
    handle.stop()


def test_resolve_redis_waits_for_the_supervised_server_to_come_back(tmp_path: Path) -> None:
    settings = CommonSettings(var_dir=tmp_path / "var", redis_url=None, redis_wait_s=10)
    supervisor = RedisSupervisor(PrivateRedis(settings.redis_dir), min_delay_s=1.0, poll_s=0.05)
    supervisor.start()
    try:
        pid = supervisor.server.pid
        assert pid is not None
        supervisor.server.kill()  # the supervisor's child dies; it restarts it after 1 s
        url, handle = resolve_redis(settings)
        assert handle is None  # serve's server, not a second one
        assert supervisor.restarts == 1 and supervisor.server.pid not in (None, pid)
        with redis.Redis.from_url(url) as c:
            assert c.ping()
    finally:
        supervisor.stop()
