"""Tests for the supervisor of the private redis-server: restart, backoff, degraded, adoption, the lock.

Real `redis-server` children, killed with real signals.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from core.redis_server import PrivateRedis, RedisServerError, supervisor_holder
from core.redis_supervisor import FAILED, STOPPED, UP, RedisSupervisor, describe_exit


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> float:
    """Poll until `condition()`; the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def results() -> list[str]:
    return []


@pytest.fixture
def supervisor(tmp_path: Path, results: list[str]) -> Iterator[RedisSupervisor]:
    s = RedisSupervisor(
        PrivateRedis(tmp_path / "redis", appendfsync="always"),
        min_delay_s=0.1,
        max_delay_s=0.8,
        stable_s=60,
        degrade_after=3,
        poll_s=0.05,
        on_restart=results.append,
    )
    s.start()
    yield s
    s.stop()


def client(s: RedisSupervisor) -> redis.Redis:
    return redis.Redis.from_url(s.url, decode_responses=True)


def kill_child(s: RedisSupervisor) -> int:
    pid = s.server.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


def test_a_killed_child_is_restarted_on_the_same_socket_with_its_data(
    supervisor: RedisSupervisor, results: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert supervisor.state == UP and supervisor.server.owned
    assert supervisor_holder(supervisor.server.data_dir) == f"pid {os.getpid()}"
    with client(supervisor) as c:
        for i in range(200):
            c.xadd("s", {"i": str(i)})
    with caplog.at_level(logging.INFO, logger="secondstage.redis"):
        old = kill_child(supervisor)
        wait_for(lambda: supervisor.restarts == 1 and supervisor.up, what="restart")
    assert supervisor.server.pid not in (None, old)
    with client(supervisor) as c:
        assert c.xlen("s") == 200  # the AOF replayed on start
    assert results == ["ok"]
    assert "killed by SIGKILL; restarting it" in caplog.text
    assert "private redis-server back" in caplog.text


def test_repeated_kills_back_off_instead_of_a_restart_storm(supervisor: RedisSupervisor, results: list[str]) -> None:
    delays, downtimes = [], []
    for n in range(1, 6):
        kill_child(supervisor)
        downtimes.append(wait_for(lambda n=n: supervisor.restarts == n and supervisor.up, what=f"restart {n}"))  # type: ignore[misc]
        delays.append(supervisor.last_delay_s)
    assert delays == [0.1, 0.2, 0.4, 0.8, 0.8]  # doubling, capped at max_delay_s
    assert all(down >= delay for down, delay in zip(downtimes, delays, strict=True))
    assert results == ["ok"] * 5  # one restart per exit, no more


def test_backoff_resets_after_the_child_stayed_up(tmp_path: Path) -> None:
    s = RedisSupervisor(PrivateRedis(tmp_path / "redis"), min_delay_s=0.1, max_delay_s=5, stable_s=0.3, poll_s=0.05)
    s.start()
    try:
        kill_child(s)
        wait_for(lambda: s.restarts == 1 and s.up)
        kill_child(s)  # at once: the backoff grows
        wait_for(lambda: s.restarts == 2 and s.up)
        assert s.last_delay_s == pytest.approx(0.2)
        time.sleep(0.5)  # longer than stable_s
        kill_child(s)
        wait_for(lambda: s.restarts == 3 and s.up)
        assert s.last_delay_s == pytest.approx(0.1)
    finally:
        s.stop()


def _corrupt_aof(data_dir: Path) -> tuple[Path, bytes]:
    (aof,) = (data_dir / "appendonlydir").glob("*.incr.aof")
    good = aof.read_bytes()
    aof.write_bytes(good[:20] + b"GARBAGE!!" + good[20:])
    return aof, good


def test_a_child_that_cannot_start_again_degrades_with_redis_reason_then_recovers_once_repaired(
    supervisor: RedisSupervisor, results: list[str]
) -> None:
    with client(supervisor) as c:
        c.set("k", "v")
    data_dir = supervisor.server.data_dir
    aof, good = _corrupt_aof(data_dir)  # the running server does not reread it; the next start does
    kill_child(supervisor)
    wait_for(lambda: supervisor.state == FAILED, what="degraded")
    assert supervisor.failed_starts >= 3
    assert supervisor.reason is not None and "Bad file format reading the append only file" in supervisor.reason
    assert results[:3] == ["failed"] * 3
    assert not supervisor.server.ping()

    aof.write_bytes(good)  # the operator repairs the directory; the supervisor keeps trying
    wait_for(lambda: supervisor.up, what="recovery")
    assert supervisor.reason is None and supervisor.failed_starts == 0
    assert results[-1] == "ok"
    with client(supervisor) as c:
        assert c.get("k") == "v"


def test_a_server_already_running_is_adopted_and_replaced_by_a_child_when_it_goes(tmp_path: Path) -> None:
    other = PrivateRedis(tmp_path / "redis")  # e.g. started by `secondstage align run` before serve
    other.start()
    s = RedisSupervisor(PrivateRedis(tmp_path / "redis"), min_delay_s=0.05, poll_s=0.05)
    s.start()
    try:
        assert s.up and not s.server.owned
        other.stop()  # its owner exits and shuts it down
        wait_for(lambda: s.restarts == 1 and s.up, what="own child")
        assert s.server.owned and s.server.ping()
    finally:
        s.stop()
    assert not PrivateRedis(tmp_path / "redis").ping()


def test_a_second_supervisor_on_the_directory_is_refused(supervisor: RedisSupervisor) -> None:
    second = RedisSupervisor(PrivateRedis(supervisor.server.data_dir))
    with pytest.raises(RedisServerError, match="already supervised by another process"):
        second.start()
    assert supervisor.up and second.state == STOPPED


def test_stop_shuts_the_child_down_cleanly_and_releases_the_directory(tmp_path: Path) -> None:
    s = RedisSupervisor(PrivateRedis(tmp_path / "redis"), poll_s=0.05)
    s.start()
    with client(s) as c:
        c.set("k", "v")
    s.stop()
    assert s.state == STOPPED and s.restarts == 0  # a clean stop is not an exit to restart from
    assert supervisor_holder(tmp_path / "redis") is None
    assert not s.server.ping()
    with PrivateRedis(tmp_path / "redis") as again, redis.Redis.from_url(again.url) as c:
        assert c.get("k") == b"v"


def test_exit_statuses_read_as_people_say_them() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(1) == "exited with code 1"
    assert describe_exit(0) == "exited with code 0"


def test_bad_backoff_settings_are_refused_naming_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_delay_s=2"):
        RedisSupervisor(PrivateRedis(tmp_path / "r"), min_delay_s=2, max_delay_s=1)
    with pytest.raises(ValueError, match="degrade_after=0"):
        RedisSupervisor(PrivateRedis(tmp_path / "r"), degrade_after=0)
