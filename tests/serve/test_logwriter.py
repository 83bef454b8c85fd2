"""Tests for the bounded async log writer, against a real redis-server that they kill and restart.

Run the throughput check with output: `pytest tests/serve/test_logwriter.py -k throughput -s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import prometheus_client
import pytest
import redis.asyncio

from core.keys import SCHEMA_VERSION, Keys
from core.redis_server import PrivateRedis
from serve.logwriter import LogWriter, Record

KEYS = Keys("t")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    # fsync always: these tests SIGKILL Redis and count records; everysec may drop acknowledged writes then.
    s = PrivateRedis(tmp_path / "redis", appendfsync="always")
    s.start()
    yield s
    if s.owned:
        s.stop()


@pytest.fixture
def factory(server: PrivateRedis) -> Callable[[], redis.asyncio.Redis]:
    def make() -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(server.url, socket_timeout=2.0, socket_connect_timeout=2.0)

    return make


@pytest.fixture
async def reader(server: PrivateRedis) -> AsyncIterator[redis.asyncio.Redis]:
    c = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    yield c
    await c.aclose()


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    return prometheus_client.CollectorRegistry()


@pytest.fixture(params=[True, False], ids=["script", "pipeline"])
def batch_script(request: pytest.FixtureRequest) -> bool:
    """Both write paths: the batch-append Lua script and the plain-pipeline fallback."""
    return request.param


def completion(i: int, *, indexed: bool = True) -> Record:
    cid = f"chatcmpl-{i:06d}"
    data = json.dumps({"id": cid, "text": "hello " * 8})
    return Record(
        stream=KEYS.completions,
        fields={"schema": SCHEMA_VERSION, "id": cid, "data": data},
        index_key=KEYS.completion(cid) if indexed else None,
        index_value=data if indexed else None,
    )


async def ids_in_stream(c: redis.asyncio.Redis, stream: str = KEYS.completions) -> list[str]:
    return [fields["id"] for _, fields in await c.xrange(stream)]


def first_seen(ids: list[str]) -> list[str]:
    """Readers dedupe by record id: at-least-once delivery may repeat a record."""
    return list(dict.fromkeys(ids))


async def eventually(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_records_reach_the_stream_and_index_keys_are_set(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    batch_script: bool,
    tmp_path: Path,
) -> None:
    w = LogWriter(factory, tmp_path / "spool", batch_size=16, batch_script=batch_script, registry=registry)
    await w.start()
    for i in range(100):
        w.submit(completion(i))
    w.submit(Record(stream=KEYS.feedback, fields={"id": "fb-1", "completion_id": "chatcmpl-000001"}))
    await eventually(lambda: w.written_total == 101)
    await w.stop()

    assert await ids_in_stream(reader) == [f"chatcmpl-{i:06d}" for i in range(100)]
    assert await ids_in_stream(reader, KEYS.feedback) == ["fb-1"]
    stored = json.loads(await reader.get(KEYS.completion("chatcmpl-000042")))
    assert stored["id"] == "chatcmpl-000042"
    assert (w.spooled_total, w.spool_records, w.queue_depth) == (0, 0, 0)
    assert registry.get_sample_value("secondstage_log_records_written_total") == 101
    assert registry.get_sample_value("secondstage_log_records_spooled_total") == 0
    assert registry.get_sample_value("secondstage_log_queue_depth") == 0
    assert not (tmp_path / "spool" / "spool.jsonl").exists() or (tmp_path / "spool" / "spool.jsonl").stat().st_size == 0


async def test_maxlen_trims_the_stream(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    batch_script: bool,
    tmp_path: Path,
) -> None:
    async with LogWriter(factory, tmp_path / "spool", batch_script=batch_script, registry=registry) as w:
        for i in range(2000):
            w.submit(Record(stream="t:trimmed", fields={"id": str(i)}, maxlen=100))
    # `~` trims whole macro nodes, so the stream is near 100, far below 2000.
    assert await reader.xlen("t:trimmed") < 500
    assert w.written_total == 2000


async def test_full_queue_spills_to_the_spool_and_nothing_is_lost(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    tmp_path: Path,
) -> None:
    w = LogWriter(factory, tmp_path / "spool", max_queue=10, registry=registry)
    for i in range(25):  # not started: nothing drains, as when Redis is stuck
        w.submit(completion(i))
    assert (w.queue_depth, w.spool_records, w.spooled_total) == (10, 15, 15)
    assert registry.get_sample_value("secondstage_log_spool_records") == 15
    assert w.is_pending(KEYS.completion("chatcmpl-000003")) and w.is_pending(KEYS.completion("chatcmpl-000020"))
    await w.start()
    await eventually(lambda: w.spool_records == 0 and w.queue_depth == 0 and w.written_total == 25)
    await w.stop()
    ids = await ids_in_stream(reader)
    assert sorted(ids) == [f"chatcmpl-{i:06d}" for i in range(25)]
    # The spool is replayed before the queue, in the order it was written.
    assert ids[:15] == [f"chatcmpl-{i:06d}" for i in range(10, 25)]
    assert not w.is_pending(KEYS.completion("chatcmpl-000003"))


async def test_redis_killed_mid_traffic_then_everything_is_replayed(
    server: PrivateRedis,
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    batch_script: bool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="secondstage.logwriter")
    w = LogWriter(
        factory, tmp_path / "spool", batch_size=64, retry_interval=0.05, batch_script=batch_script, registry=registry
    )
    await w.start()
    n = 0

    async def traffic(count: int) -> None:
        nonlocal n
        for _ in range(count):
            w.submit(completion(n))  # must never raise, whatever Redis does
            n += 1
            if n % 50 == 0:
                await asyncio.sleep(0)

    await traffic(3000)
    await asyncio.to_thread(server.kill)
    await traffic(3000)
    await eventually(lambda: w.redis_down and w.queue_depth == 0)
    assert w.spool_records > 0
    assert w.is_pending(KEYS.completion(f"chatcmpl-{n - 1:06d}"))
    await traffic(1000)  # more records while down
    await asyncio.to_thread(server.restart)
    await traffic(1000)  # and while the spool replays
    await eventually(lambda: not w.redis_down and w.spool_records == 0 and w.queue_depth == 0)
    await w.stop()

    ids = await ids_in_stream(reader)
    unique = first_seen(ids)
    assert len(unique) == n == 8000
    # Confirmed writes, replays included; a batch Redis applied just before dying was never confirmed,
    # so the stream may hold a few more entries than that (the duplicates readers drop).
    assert n <= w.written_total <= len(ids)
    # No queue overflow happened, so even the global order survives the outage.
    assert unique == [f"chatcmpl-{i:06d}" for i in range(n)]
    assert await reader.get(KEYS.completion(f"chatcmpl-{n - 1:06d}")) is not None
    assert not w.is_pending(KEYS.completion(f"chatcmpl-{n - 1:06d}"))
    assert registry.get_sample_value("secondstage_log_write_errors_total") >= 1
    # Logged once down and once back, not per record or per retry.
    messages = [r.getMessage() for r in caplog.records if r.name == "secondstage.logwriter"]
    assert sum("Redis unavailable" in m for m in messages) == 1
    assert sum("Redis is back" in m for m in messages) == 1


async def test_stop_while_redis_is_down_spools_everything_for_the_next_writer(
    server: PrivateRedis, factory: Callable[[], redis.asyncio.Redis], reader: redis.asyncio.Redis, tmp_path: Path
) -> None:
    w = LogWriter(factory, tmp_path / "spool", retry_interval=0.05, registry=prometheus_client.CollectorRegistry())
    await w.start()
    await asyncio.to_thread(server.kill)
    for i in range(500):
        w.submit(completion(i))
    await w.stop(timeout=2)
    assert (w.queue_depth, w.spool_records) == (0, 500)
    w.submit(completion(500))  # after stop: straight to disk, still no exception
    assert w.spool_records == 501

    await asyncio.to_thread(server.restart)
    w2 = LogWriter(factory, tmp_path / "spool", registry=prometheus_client.CollectorRegistry())
    await w2.start()
    assert w2.is_pending(KEYS.completion("chatcmpl-000007"))  # known from the spool before replay
    await eventually(lambda: w2.spool_records == 0)
    await w2.stop()
    assert first_seen(await ids_in_stream(reader)) == [f"chatcmpl-{i:06d}" for i in range(501)]
    assert not w2.is_pending(KEYS.completion("chatcmpl-000007"))
    assert list((tmp_path / "spool").glob("replay-*")) == []


async def test_stop_drains_the_queue_when_redis_is_up(
    factory: Callable[[], redis.asyncio.Redis], reader: redis.asyncio.Redis, tmp_path: Path
) -> None:
    w = LogWriter(factory, tmp_path / "spool", registry=prometheus_client.CollectorRegistry())
    await w.start()
    for i in range(3000):
        w.submit(completion(i))
    await w.stop()
    assert await reader.xlen(KEYS.completions) == 3000
    assert w.spooled_total == 0


async def test_is_pending_tracks_records_until_they_are_in_redis(
    server: PrivateRedis, factory: Callable[[], redis.asyncio.Redis], tmp_path: Path
) -> None:
    w = LogWriter(factory, tmp_path / "spool", retry_interval=0.05, registry=prometheus_client.CollectorRegistry())
    key = KEYS.completion("chatcmpl-000001")
    assert not w.is_pending(key)
    w.submit(completion(1))
    assert w.is_pending(key)  # queued
    await w.start()
    await eventually(lambda: not w.is_pending(key))
    assert w.written_total == 1

    await asyncio.to_thread(server.kill)
    w.submit(completion(2))
    await eventually(lambda: w.redis_down and w.spool_records == 1)
    assert w.is_pending(KEYS.completion("chatcmpl-000002"))  # spooled
    await asyncio.to_thread(server.restart)
    await eventually(lambda: not w.is_pending(KEYS.completion("chatcmpl-000002")))
    await w.stop()


async def test_is_pending_memory_is_bounded(tmp_path: Path) -> None:
    w = LogWriter(
        lambda: None,  # type: ignore[arg-type,return-value]  # never started: no client needed
        tmp_path / "spool",
        max_queue=100,
        pending_cap=50,
        registry=prometheus_client.CollectorRegistry(),
    )
    # Every record stays pending; only the newest 50 are remembered.
    for i in range(200):
        w.submit(completion(i))
    assert len(w._pending) == 50
    assert w.is_pending(KEYS.completion("chatcmpl-000199")) and not w.is_pending(KEYS.completion("chatcmpl-000000"))
    await w.stop()


async def test_records_redis_refuses_are_kept_aside_not_retried(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    batch_script: bool,
    tmp_path: Path,
) -> None:
    await reader.set("t:not-a-stream", "x")  # XADD on it fails with WRONGTYPE, forever
    async with LogWriter(factory, tmp_path / "spool", batch_script=batch_script, registry=registry) as w:
        w.submit(completion(1))
        w.submit(Record(stream="t:not-a-stream", fields={"id": "bad"}))
        w.submit(Record(stream=KEYS.completions, fields={"id": "none-value", "data": None}))  # type: ignore[dict-item]
        w.submit(completion(2))
        await eventually(lambda: w.written_total == 2 and w.write_errors_total == 2)
    assert await ids_in_stream(reader) == ["chatcmpl-000001", "chatcmpl-000002"]
    rejected = [json.loads(line) for line in (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()]
    assert [json.loads(r["record"])["f"]["id"] for r in rejected] == ["bad", "none-value"]
    assert "WRONGTYPE" in rejected[0]["error"]
    assert w.spooled_total == 0 and not w.redis_down
    assert registry.get_sample_value("secondstage_log_write_errors_total") == 2


async def test_falls_back_to_pipelines_where_scripting_is_forbidden(
    server: PrivateRedis, reader: redis.asyncio.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await reader.acl_setuser("noscript", enabled=True, nopass=True, keys=["*"], commands=["+@all", "-@scripting"])

    def factory() -> redis.asyncio.Redis:
        return redis.asyncio.Redis.from_url(server.url, username="noscript")

    async with LogWriter(factory, tmp_path / "spool", registry=prometheus_client.CollectorRegistry()) as w:
        for i in range(10):
            w.submit(completion(i))
        await eventually(lambda: w.written_total == 10)
    assert await ids_in_stream(reader) == [f"chatcmpl-{i:06d}" for i in range(10)]
    assert w.spooled_total == 0 and w.write_errors_total == 0
    assert any("plain pipelines" in r.getMessage() for r in caplog.records)


async def test_a_torn_spool_line_from_a_crash_is_set_aside(
    factory: Callable[[], redis.asyncio.Redis], reader: redis.asyncio.Redis, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "spool.jsonl").write_text(completion(1).to_json() + "\n" + completion(2).to_json()[:30])
    async with LogWriter(factory, spool, registry=prometheus_client.CollectorRegistry()) as w:
        await eventually(lambda: w.spool_records == 0)
    assert await ids_in_stream(reader) == ["chatcmpl-000001"]
    assert "unreadable spool line" in (spool / "rejected.jsonl").read_text()


async def test_replay_resumes_from_its_saved_offset(
    factory: Callable[[], redis.asyncio.Redis], reader: redis.asyncio.Redis, tmp_path: Path
) -> None:
    # As if a previous run crashed after replaying the first record of this file.
    spool = tmp_path / "spool"
    spool.mkdir()
    first, second = completion(1).to_json() + "\n", completion(2).to_json() + "\n"
    (spool / "replay-00000000000000000001.jsonl").write_text(first + second)
    (spool / "replay-00000000000000000001.offset").write_text(str(len(first.encode())))
    async with LogWriter(factory, spool, registry=prometheus_client.CollectorRegistry()) as w:
        assert w.spool_records == 1
        await eventually(lambda: w.spool_records == 0)
    assert await ids_in_stream(reader) == ["chatcmpl-000002"]


async def test_one_writer_per_spool_directory(factory: Callable[[], redis.asyncio.Redis], tmp_path: Path) -> None:
    async with LogWriter(factory, tmp_path / "spool", registry=prometheus_client.CollectorRegistry()):
        other = LogWriter(factory, tmp_path / "spool", registry=prometheus_client.CollectorRegistry())
        with pytest.raises(RuntimeError, match="in use by another LogWriter"):
            await other.start()


def test_bad_parameters_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        LogWriter(lambda: None, tmp_path, batch_size=0, registry=prometheus_client.CollectorRegistry())  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="index_key"):
        Record(stream="s", fields={}, index_key="k")


async def test_throughput(batch_script: bool, tmp_path: Path) -> None:
    """Not a timing assertion (shared CI machines vary); prints the rate. Run with -s."""
    n = 50_000 if batch_script else 10_000
    records = [completion(i) for i in range(n)]
    with PrivateRedis(tmp_path / "redis") as server:  # the production configuration (appendfsync always)
        reader = redis.asyncio.Redis.from_url(server.url)
        try:
            rate = await _measure(
                lambda: redis.asyncio.Redis.from_url(server.url), reader, records, batch_script, tmp_path
            )
        finally:
            await reader.aclose()
    print(rate)


async def _measure(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    records: list[Record],
    batch_script: bool,
    tmp_path: Path,
) -> str:
    n = len(records)
    w = LogWriter(
        factory,
        tmp_path / "spool",
        max_queue=n,
        batch_script=batch_script,
        registry=prometheus_client.CollectorRegistry(),
    )
    await w.start()

    async def server_cpu() -> float:
        info = await reader.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    # CPU seconds as well as wall time: on a shared, loaded machine they say what one free core would do.
    server0, cpu0, t0 = await server_cpu(), time.process_time(), time.perf_counter()
    for r in records:
        w.submit(r)
    submit_s = time.perf_counter() - t0
    await eventually(lambda: w.written_total == n, timeout=120)
    total_s, cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    server_s = await server_cpu() - server0
    await w.stop()
    assert await reader.xlen(KEYS.completions) == n
    path = "script" if batch_script else "pipeline"
    return (
        f"\nlogwriter ({path}): {n} records (XADD + index SET) in {total_s:.2f}s = {n / total_s:,.0f} records/s; "
        f"submit {submit_s / n * 1e6:.2f} µs/record; CPU per record: writer {cpu_s / n * 1e6:.1f} µs "
        f"(one core: {n / cpu_s:,.0f}/s), redis-server {server_s / n * 1e6:.1f} µs (one core: {n / server_s:,.0f}/s)"
    )


# --- no record can stop the writer (issue 10) ---------------------------------------------------------------


def surrogate_completion(i: int) -> Record:
    """A record whose text UTF-8 cannot encode: JSON's `"\\ud800"` decodes to a lone surrogate."""
    r = completion(i)
    data = json.dumps({"id": r.fields["id"], "text": "a\ud800b"}, ensure_ascii=False)
    r.fields["data"] = data
    r.index_value = data
    return r


async def test_a_record_with_a_lone_surrogate_is_sanitised_and_the_rest_flows(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    batch_script: bool,
    tmp_path: Path,
) -> None:
    async with LogWriter(factory, tmp_path / "spool", batch_script=batch_script, registry=registry) as w:
        w.submit(completion(1))
        w.submit(surrogate_completion(2))
        w.submit(completion(3))
        await eventually(lambda: w.written_total == 3)
        assert w.alive and w.health()["alive"] is True
        w.submit(completion(4))  # the writer still drains after it
        await eventually(lambda: w.written_total == 4)
    assert await ids_in_stream(reader) == [f"chatcmpl-{i:06d}" for i in (1, 2, 3, 4)]
    stored = json.loads(await reader.get(KEYS.completion("chatcmpl-000002")))
    assert stored["text"] == "a\ufffdb"
    assert registry.get_sample_value("secondstage_log_records_sanitised_total") == 1
    assert registry.get_sample_value("secondstage_log_writer_restarts_total") == 0
    assert w.restarts == 0 and w.spooled_total == 0


async def test_a_spooled_record_with_a_lone_surrogate_survives_the_spool(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    tmp_path: Path,
) -> None:
    w = LogWriter(factory, tmp_path / "spool", max_queue=1, registry=registry)
    w.submit(completion(1))
    w.submit(surrogate_completion(2))  # queue full: straight to the spool file
    assert w.spool_records == 1 and w.write_errors_total == 0
    await w.start()
    await eventually(lambda: w.written_total == 2)
    await w.stop()
    assert sorted(await ids_in_stream(reader)) == ["chatcmpl-000001", "chatcmpl-000002"]


async def test_the_drain_task_is_restarted_when_it_dies(
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = LogWriter(factory, tmp_path / "spool", retry_interval=0.05, registry=registry)
    real_write = w._write

    async def write_with_a_bug(batch: list[Record]) -> None:
        if any(r.fields["id"] == "chatcmpl-000002" for r in batch):
            raise RuntimeError("a bug in the writer")
        await real_write(batch)

    monkeypatch.setattr(w, "_write", write_with_a_bug)
    async with w:
        w.submit(completion(1))
        await eventually(lambda: w.written_total == 1)
        w.submit(completion(2))
        await eventually(lambda: w.restarts == 1)
        w.submit(completion(3))
        await eventually(lambda: w.written_total == 2)
        assert w.alive
    assert await ids_in_stream(reader) == ["chatcmpl-000001", "chatcmpl-000003"]
    rejected = [json.loads(line) for line in (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()]
    assert [json.loads(r["record"])["f"]["id"] for r in rejected] == ["chatcmpl-000002"]
    assert "a bug in the writer" in rejected[0]["error"]
    assert registry.get_sample_value("secondstage_log_writer_restarts_total") == 1
    assert registry.get_sample_value("secondstage_log_records_rejected_total") == 1
    assert not w.is_pending(KEYS.completion("chatcmpl-000002"))


async def test_health_reports_a_writer_that_is_not_draining(
    factory: Callable[[], redis.asyncio.Redis], registry: prometheus_client.CollectorRegistry, tmp_path: Path
) -> None:
    w = LogWriter(factory, tmp_path / "spool", registry=registry)
    w.submit(completion(1))  # not started: nothing drains, as when the drain task is gone
    await asyncio.sleep(0.05)
    health = w.health()
    assert health["alive"] is False and health["queue_depth"] == 1
    assert 0.05 <= w.oldest_queued_s() < 5
    assert registry.get_sample_value("secondstage_log_writer_up") == 0
    assert (registry.get_sample_value("secondstage_log_queue_oldest_seconds") or 0) >= 0.05
    async with w:
        assert registry.get_sample_value("secondstage_log_writer_up") == 1
        await eventually(lambda: w.written_total == 1)
        assert w.oldest_queued_s() == 0


async def test_concurrent_batches_lose_nothing_across_a_redis_kill(
    server: PrivateRedis,
    factory: Callable[[], redis.asyncio.Redis],
    reader: redis.asyncio.Redis,
    registry: prometheus_client.CollectorRegistry,
    tmp_path: Path,
) -> None:
    """Two batches in flight at once (concurrent_batches=2): every record arrives, in whatever order, kill included."""
    w = LogWriter(
        factory, tmp_path / "spool", batch_size=32, concurrent_batches=2, retry_interval=0.05, registry=registry
    )
    await w.start()
    concurrent_rounds = 0
    original = w._write_concurrently

    async def counting(first: list[Record]) -> None:
        nonlocal concurrent_rounds
        concurrent_rounds += 1
        await original(first)

    w._write_concurrently = counting  # type: ignore[method-assign]
    for i in range(2000):
        w.submit(completion(i))
    await eventually(lambda: w.written_total >= 1000)
    await asyncio.to_thread(server.kill)
    for i in range(2000, 4000):
        w.submit(completion(i))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await eventually(lambda: w.redis_down)
    await asyncio.to_thread(server.restart)
    await eventually(lambda: not w.redis_down and w.spool_records == 0 and w.queue_depth == 0)
    await w.stop()

    assert concurrent_rounds > 0  # the queue held more than one batch: two were written at once
    unique = set(await ids_in_stream(reader))
    assert unique == {f"chatcmpl-{i:06d}" for i in range(4000)}
    assert await reader.get(KEYS.completion("chatcmpl-003999")) is not None
    assert not w.is_pending(KEYS.completion("chatcmpl-003999"))


def test_concurrent_batches_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="concurrent_batches=0"):
        LogWriter(lambda: redis.asyncio.Redis(), tmp_path / "spool", concurrent_batches=0)
