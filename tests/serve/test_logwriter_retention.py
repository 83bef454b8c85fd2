"""Retention in the log writer (real redis-server, both write paths): MAXLEN, age (MINID) and key TTLs, and the
disk spool's cap, past which records are dropped and counted, never silently."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
import redis
import redis.asyncio

from core.redis_server import PrivateRedis
from serve.logwriter import LogWriter, Record
from serve.logwriter.spool import Spool

STREAM, KEY = "t:completions", "t:completion:"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    s = PrivateRedis(tmp_path / "redis")
    s.start()
    yield s
    s.stop()


@pytest.fixture(params=[True, False], ids=["script", "pipeline"])
def batch_script(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def record(i: int, *, maxlen: int | None = None, ttl_s: int | None = None) -> Record:
    data = json.dumps({"id": f"c{i}", "text": "hello"})
    return Record(STREAM, {"id": f"c{i}", "data": data}, f"{KEY}c{i}", data, maxlen=maxlen, ttl_s=ttl_s)


async def _eventually(check: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_maxlen_age_and_ttl_are_applied(server: PrivateRedis, tmp_path: Path, batch_script: bool) -> None:
    sync = redis.Redis.from_url(server.url)
    # 300 entries from 1970: past any age; approximate trimming drops whole nodes of 100.
    for i in range(1, 301):
        sync.xadd(STREAM, {"id": f"old{i}"}, id=f"{i}-0")

    def factory() -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(server.url)

    reg = prometheus_client.CollectorRegistry()
    async with LogWriter(factory, tmp_path / "spool", registry=reg, batch_script=batch_script) as w:
        w.submit(record(0, ttl_s=3600))
        await _eventually(lambda: w.written_total == 1)
        assert sync.xlen(STREAM) <= 1 + 100  # the old entries went by age
        assert 3500 < sync.ttl(f"{KEY}c0") <= 3600
        for i in range(1, 400):
            w.submit(record(i, maxlen=10))
        await _eventually(lambda: w.written_total == 400)
    assert sync.xlen(STREAM) <= 10 + 100  # by size: `~` keeps at most a node more than asked
    assert sync.ttl(f"{KEY}c5") == -1  # no ttl_s, no expiry
    sync.close()


def test_the_spool_cap_drops_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    line = len(record(0).to_json()) + 1
    spool = Spool(tmp_path / "spool", max_bytes=3 * line + line // 2)
    with caplog.at_level(logging.ERROR, logger="secondstage.logwriter"):
        assert spool.append([record(i) for i in range(2)]) == 2
        assert spool.append([record(i) for i in range(2, 5)]) == 1
        assert spool.append([record(5)]) == 0
    assert (spool.dropped, spool.records, spool.size) == (3, 3, 3 * line)
    assert [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]  # logged, not silent
    spool.rotate()
    [replay] = spool.replay_files()
    spool.finish(replay)  # replayed: room again
    assert spool.size == 0 and spool.append([record(6)]) == 1
    spool.close()


async def test_a_full_spool_counts_dropped_records_in_the_writer(tmp_path: Path) -> None:
    def down() -> redis.asyncio.Redis:  # no server at this socket: every record goes to the spool
        return redis.asyncio.Redis(unix_socket_path=str(tmp_path / "none.sock"), socket_connect_timeout=0.2)

    reg = prometheus_client.CollectorRegistry()
    line = len(record(0).to_json()) + 1
    async with LogWriter(down, tmp_path / "spool", registry=reg, max_queue=1, spool_max_bytes=5 * line) as w:
        for i in range(20):
            w.submit(record(i))
        await _eventually(
            lambda: w.spooled_total + (reg.get_sample_value("secondstage_log_records_dropped_total") or 0) == 20
        )
        assert w.spooled_total == 5
    assert reg.get_sample_value("secondstage_log_records_dropped_total") == 15
