"""`LogWriter`: the queue, the drain task that empties it into Redis, outages and replay.

`submit` puts a record on a bounded in-memory queue (or, when it is full, straight into the spool)
and wakes the drain task, which writes `batch_size` records per round trip through the transport.
On a transient Redis failure the batch and everything queued after it go to the spool and the task
pings Redis every `retry_interval`; when Redis answers, the spool is replayed first, then the queue.
Records Redis refuses for good are moved to the spool's `rejected.jsonl` and count as done.

No record can stop the writer: a batch that cannot even be sent is retried record by record; a record
whose text UTF-8 cannot encode (a lone surrogate) is written sanitised (U+FFFD), counted in
`secondstage_log_records_sanitised_total`; one that still cannot be written is set aside in
`rejected.jsonl` (`secondstage_log_records_rejected_total`). Should the drain loop die anyway (a bug, a
failing spool disk), a supervisor sets the batch it held aside and restarts it after `retry_interval`
(`secondstage_log_writer_restarts_total`). `health()` and the gauges `secondstage_log_writer_up` and
`secondstage_log_queue_oldest_seconds` show a writer that is not draining.
See the package docstring for the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import prometheus_client
import redis.asyncio

from serve.logwriter.record import Record
from serve.logwriter.spool import Spool
from serve.logwriter.transport import BatchTransport, describe, is_transient

log = logging.getLogger("secondstage.logwriter")


class LogWriter:
    """Queue → Redis in batches, with a disk spool for when Redis is away. See the module docstring.

    The writer owns the client `client_factory` returns: it turns off the client's own retries
    (the writer retries, and a retrying client would hide an outage for seconds) and closes it on stop.
    `op_timeout` bounds each Redis call; `pending_cap` bounds is_pending's memory (default 10 × max_queue,
    oldest forgotten first); `batch_script=False` writes with plain pipelines instead of the Lua script;
    `spool_max_bytes` caps the disk spool (past it records are dropped and counted, see spool.py).
    `concurrent_batches` > 1 writes that many batches at once on separate connections when the queue holds them
    (encoding overlaps Redis' work; batches may then reach the stream out of order, readers order by nothing but id).
    `linger` (seconds) lets a batch that is not full wait that long for more records before it is written: one
    round trip then carries several completions instead of one each (at tens to hundreds of requests a second the
    queue rarely holds more than one), at the price of records reaching Redis up to `linger` later.
    """

    def __init__(
        self,
        client_factory: Callable[[], redis.asyncio.Redis],
        spool_dir: Path,
        *,
        max_queue: int = 10_000,
        batch_size: int = 256,
        retry_interval: float = 0.5,
        op_timeout: float = 5.0,
        pending_cap: int | None = None,
        batch_script: bool = True,
        concurrent_batches: int = 1,
        linger: float = 0.0,
        registry: prometheus_client.CollectorRegistry | None = None,
        spool_max_bytes: int | None = None,
    ) -> None:
        for name, value in (
            ("max_queue", max_queue),
            ("batch_size", batch_size),
            ("concurrent_batches", concurrent_batches),
        ):
            if value < 1:
                raise ValueError(f"LogWriter {name}={value} must be at least 1")
        for name, fvalue in (("retry_interval", retry_interval), ("op_timeout", op_timeout)):
            if fvalue <= 0:
                raise ValueError(f"LogWriter {name}={fvalue} must be positive (seconds)")
        self._client_factory = client_factory
        self._spool = Spool(Path(spool_dir), max_bytes=spool_max_bytes)
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._retry_interval = retry_interval
        self._op_timeout = op_timeout
        # is_pending memory: the queue, plus room for a long outage's worth of spooled keys.
        self._pending_cap = pending_cap if pending_cap is not None else max_queue * 10

        self._queue: deque[Record] = deque()
        self._pending: dict[str, int] = {}
        self._inflight: list[Record] | None = None
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._transport: BatchTransport | None = None  # from start() to stop()
        self._batch_script = batch_script
        self._concurrent_batches = concurrent_batches
        self._linger = max(0.0, linger)
        self._down = False
        self._down_since = 0.0
        self._closed = False
        self._restart_delay = retry_interval
        self.written_total = 0
        self.spooled_total = 0
        self.write_errors_total = 0
        self.rejected_total = 0
        self.sanitised_total = 0
        self.restarts = 0

        reg = prometheus_client.REGISTRY if registry is None else registry
        depth = prometheus_client.Gauge(
            "secondstage_log_queue_depth", "Log records waiting in memory for Redis.", registry=reg
        )
        depth.set_function(lambda: len(self._queue))
        spool = prometheus_client.Gauge(
            "secondstage_log_spool_records", "Log records on disk waiting for Redis to come back.", registry=reg
        )
        spool.set_function(lambda: self._spool.records)
        self._m_written = prometheus_client.Counter(
            "secondstage_log_records_written", "Log records written to Redis.", registry=reg
        )
        self._m_spooled = prometheus_client.Counter(
            "secondstage_log_records_spooled", "Log records written to the disk spool.", registry=reg
        )
        self._m_dropped = prometheus_client.Counter(
            "secondstage_log_records_dropped", "Log records dropped because the disk spool was full.", registry=reg
        )
        self._m_errors = prometheus_client.Counter(
            "secondstage_log_write_errors",
            "Failed Redis writes (whole batches) and records Redis refused.",
            registry=reg,
        )
        self._m_rejected = prometheus_client.Counter(
            "secondstage_log_records_rejected",
            "Log records set aside in rejected.jsonl (Redis refused them, or they could not be written at all).",
            registry=reg,
        )
        self._m_sanitised = prometheus_client.Counter(
            "secondstage_log_records_sanitised",
            "Log records written after replacing what Redis cannot take (lone surrogates became U+FFFD).",
            registry=reg,
        )
        self._m_restarts = prometheus_client.Counter(
            "secondstage_log_writer_restarts",
            "Times the drain task died (a bug or a failing spool disk) and was restarted.",
            registry=reg,
        )
        oldest = prometheus_client.Gauge(
            "secondstage_log_queue_oldest_seconds",
            "Age of the oldest log record waiting in memory (0 when none): grows when the writer is stuck.",
            registry=reg,
        )
        oldest.set_function(self.oldest_queued_s)
        up = prometheus_client.Gauge(
            "secondstage_log_writer_up", "1 while the drain task runs, 0 when it is dead or stopped.", registry=reg
        )
        up.set_function(lambda: float(self.alive))

    # --- request path -------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a record over; returns at once and never raises (failures are logged and counted)."""
        try:
            if record.index_key is not None:
                self._add_pending(record.index_key)
            if len(self._queue) < self._max_queue and not self._closed:
                record.queued_at = time.monotonic()
                self._queue.append(record)
                if not self._wake.is_set():
                    self._wake.set()
                return
            self._spool_append([record])
            if self._closed:
                self._spool.close()  # no drain task left to fsync it
        except Exception:
            # Only a failing disk (full, read-only) with a full queue gets here.
            self.write_errors_total += 1
            self._m_errors.inc()
            log.exception(
                "log record for stream %s lost: queue full and spool %s unwritable", record.stream, self._spool.dir
            )

    def is_pending(self, index_key: str) -> bool:
        """True while a record with this index key is queued, being written, or spooled (not yet in Redis)."""
        return index_key in self._pending

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spool_records(self) -> int:
        return self._spool.records

    @property
    def redis_down(self) -> bool:
        return self._down

    @property
    def alive(self) -> bool:
        """True while the drain task runs (between start and stop, and not dead)."""
        return self._task is not None and not self._task.done()

    def oldest_queued_s(self) -> float:
        """Seconds the oldest record in memory (being written or queued) has waited; 0 when there is none."""
        first = self._inflight[0] if self._inflight else self._queue[0] if self._queue else None
        if first is None or not first.queued_at:
            return 0.0
        return max(0.0, time.monotonic() - first.queued_at)

    def health(self) -> dict[str, object]:
        """What /health reports about the writer: is it running, can it reach Redis, how far behind is it."""
        return {
            "alive": self.alive,
            "redis_reachable": not self._down,
            "queue_depth": len(self._queue),
            "oldest_queued_s": round(self.oldest_queued_s(), 3),
            "spool_records": self._spool.records,
            "restarts": self.restarts,
            "rejected": self.rejected_total,
        }

    def _add_pending(self, key: str) -> None:
        pending = self._pending
        if key in pending:
            pending[key] += 1
            return
        pending[key] = 1
        if len(pending) > self._pending_cap:
            del pending[next(iter(pending))]  # forget the oldest; is_pending says False for it from now on

    def _done_pending(self, records: list[Record]) -> None:
        pending = self._pending
        for r in records:
            key = r.index_key
            if key is not None and key in pending:
                if pending[key] <= 1:
                    del pending[key]
                else:
                    pending[key] -= 1

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start draining; replay any spool a previous run left behind."""
        if self._task is not None:
            return
        self._spool.lock()
        # Whatever the previous run appended becomes a replay file; this run appends to a fresh one.
        self._spool.rotate()
        count, keys = await asyncio.to_thread(self._spool.scan)
        self._spool.records = count + self._spool.active_records
        for key in keys:
            if key not in self._pending:  # records this process spooled before start() are tracked already
                self._add_pending(key)
        if count:
            log.info("replaying %d log records spooled by a previous run from %s", count, self._spool.dir)
        self._transport = BatchTransport(
            self._client_factory(), op_timeout=self._op_timeout, use_script=self._batch_script
        )
        self._closed = False
        self._stop_requested.clear()
        self._task = asyncio.create_task(self._supervise(), name="secondstage-logwriter")
        self._task.add_done_callback(self._task_done)

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what can be written within `timeout`, spool the rest, fsync. Nothing stays only in memory."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            self._stop_requested.set()
            self._wake.set()
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        leftover: list[Record] = list(self._inflight or [])
        self._inflight = None
        leftover.extend(self._queue)
        self._queue.clear()
        if leftover:
            self._spool_append(leftover)
            log.warning("spooled %d log records at shutdown to %s", len(leftover), self._spool.dir)
        self._spool.close()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.aclose()
            self._transport = None

    async def __aenter__(self) -> LogWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- drain task ----------------------------------------------------------------------------

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # _supervise restarts _run; only a bug in _supervise itself gets here. Records then wait for stop().
            log.error("log writer supervisor died; records now wait for stop()", exc_info=task.exception())

    async def _supervise(self) -> None:
        """Run the drain loop; when it dies, set its batch aside and start it again (no record can stop the writer)."""
        while True:
            try:
                await self._run()
                return
            except Exception as exc:
                # Only a bug or a failing spool disk gets here. The batch in hand may be what killed the loop:
                # set it aside (not back on the queue, where it would kill the loop again), and go on.
                self.restarts += 1
                self._m_restarts.inc()
                batch, self._inflight = self._inflight or [], None
                log.error(
                    "log writer drain task died (restart %d); setting its batch of %d records aside",
                    self.restarts, len(batch), exc_info=exc,
                )  # fmt: skip
                if batch:
                    self._done_pending(batch)
                    self._reject([(r.to_json(), f"drain task died on it: {describe(exc)}") for r in batch])
                if self._stop_requested.is_set():
                    return
                # A loop that dies at once again (e.g. a disk that stays broken) must not spin the event loop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._restart_delay):
                        await self._stop_requested.wait()

    async def _run(self) -> None:
        while True:
            await self._spool.fsync()  # records the request path spooled on overflow
            if self._down:
                # Move the queue to disk while waiting: a crash during an outage then loses nothing.
                while self._queue:
                    self._spool_append(self._take())
                    await self._spool.fsync()
                if self._stop_requested.is_set():
                    return
                if await self._started_transport().ping():
                    self._set_up()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._retry_interval):
                            await self._stop_requested.wait()
                    continue
            # At shutdown only the queue is flushed; the spool is safe on disk for the next start.
            if self._spool.records and not self._stop_requested.is_set() and not await self._replay():
                continue
            if 0 < len(self._queue) < self._batch_size and self._linger and not self._stop_requested.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._stop_requested.wait()  # stop() flushes at once
            batch = self._take()
            if not batch:
                if self._stop_requested.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._concurrent_batches > 1 and self._queue:
                await self._write_concurrently(batch)
                continue
            # Held here until written or spooled, so that stop() cancelling the write can spool it.
            self._inflight = batch
            try:
                await self._write(batch)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._spool_append(batch)
                self._inflight = None
                self._set_down(exc)
                continue
            self._inflight = None
            self._done_pending(batch)

    async def _write_concurrently(self, first: list[Record]) -> None:
        """Up to `concurrent_batches` batches at once, each on its own pooled connection: this process encodes
        the next batch while Redis applies (and, with appendfsync always, fsyncs) the one before. Batches may
        land out of order; a batch that fails transiently is spooled, the others count as written."""
        batches = [first]
        while len(batches) < self._concurrent_batches and self._queue:
            batches.append(self._take())
        self._inflight = [r for b in batches for r in b]
        results = await asyncio.gather(*(self._write(b) for b in batches), return_exceptions=True)
        transient: BaseException | None = None
        fatal: list[tuple[list[Record], BaseException]] = []
        for batch, result in zip(batches, results, strict=True):
            if result is None:
                self._done_pending(batch)
            elif isinstance(result, Exception) and is_transient(result):
                self._spool_append(batch)
                transient = transient or result
            else:
                fatal.append((batch, result))
        self._inflight = None
        if fatal:
            # Only a bug gets here: the supervisor sets the batch aside, as with one batch at a time.
            self._inflight = fatal[0][0]
            raise fatal[0][1]
        if transient is not None:
            self._set_down(transient)

    def _take(self) -> list[Record]:
        q = self._queue
        n = min(self._batch_size, len(q))
        return [q.popleft() for _ in range(n)]

    def _spool_append(self, records: list[Record]) -> None:
        kept = self._spool.append(records)  # past the spool's cap it drops (and logs) the rest
        self.spooled_total += kept
        self._m_spooled.inc(kept)
        if kept < len(records):
            self._m_dropped.inc(len(records) - kept)

    def _set_down(self, exc: BaseException) -> None:
        self.write_errors_total += 1
        self._m_errors.inc()
        if not self._down:
            self._down, self._down_since = True, time.monotonic()
            log.warning(
                "Redis unavailable (%s: %s); spooling log records to %s and retrying every %ss",
                type(exc).__name__, exc, self._spool.dir, self._retry_interval,
            )  # fmt: skip

    def _set_up(self) -> None:
        self._down = False
        log.info(
            "Redis is back after %.1fs; replaying %d spooled log records",
            time.monotonic() - self._down_since,
            self._spool.records,
        )

    async def _replay(self) -> bool:
        """Write every spooled record to Redis, oldest first. False if Redis failed on the way."""
        self._spool.rotate()
        for path in self._spool.replay_files():
            for lines, end in self._spool.batches(path, self._batch_size):
                batch: list[Record] = []
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        batch.append(Record.from_json(line))
                    except (ValueError, KeyError, TypeError) as exc:
                        # A torn last line from a crash mid-append; keep it for inspection.
                        self._reject([(line.decode(errors="replace"), f"unreadable spool line: {exc}")])
                        self._spool.records -= 1
                try:
                    await self._write(batch)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    self._set_down(exc)
                    return False
                self._spool.save_offset(path, end)
                self._spool.records -= len(batch)
                self._done_pending(batch)
                if self._stop_requested.is_set():
                    return True  # the rest stays on disk for the next start
            self._spool.finish(path)
        # Everything older is in Redis; only what the request path spooled meanwhile is left.
        self._spool.records = self._spool.active_records
        return True

    async def _write(self, batch: list[Record]) -> None:
        """Write a batch. Raises on a transient failure (the caller keeps the whole batch for a retry);
        records Redis refuses for good are moved to rejected.jsonl and count as done."""
        if not batch:
            return
        try:
            refusals = await self._started_transport().send(batch)
        except Exception as exc:
            if is_transient(exc):
                raise
            if len(batch) == 1:
                await self._write_or_set_aside(batch[0], exc)
                return
            # The batch could not even be sent (e.g. a field value that is not a str): find the culprits one by one.
            for record in batch:
                await self._write([record])
            return
        if refusals:
            self._reject([(batch[i].to_json(), error) for i, error in refusals])
        self._count_written(len(batch) - len({i for i, _ in refusals}))

    async def _write_or_set_aside(self, record: Record, exc: Exception) -> None:
        """A record that cannot be sent as it is: write its sanitised copy, or set it aside in rejected.jsonl."""
        fixed = record.sanitised() if isinstance(exc, UnicodeError) else None
        if fixed is not None:
            try:
                refusals = await self._started_transport().send([fixed])
            except Exception as again:
                if is_transient(again):
                    raise
                exc = again
            else:
                if not refusals:
                    self.sanitised_total += 1
                    self._m_sanitised.inc()
                    log.warning(
                        "log record %s had text Redis cannot take (%s); wrote it with U+FFFD",
                        record.fields.get("id"),
                        describe(exc),
                    )
                    self._count_written(1)
                    return
                exc = RuntimeError(refusals[0][1])
        self._reject([(record.to_json(), describe(exc))])

    def _started_transport(self) -> BatchTransport:
        assert self._transport is not None  # the drain task runs between start() and stop()
        return self._transport

    def _count_written(self, n: int) -> None:
        self.written_total += n
        self._m_written.inc(n)

    def _reject(self, items: list[tuple[str, str]]) -> None:
        self.write_errors_total += len(items)
        self._m_errors.inc(len(items))
        self.rejected_total += len(items)
        self._m_rejected.inc(len(items))
        log.error(
            "Redis refused %d log records (first: %s); kept in %s",
            len(items),
            items[0][1],
            self._spool.dir / "rejected.jsonl",
        )
        self._spool.reject(items)
