"""The bounded async writer that takes log records off the request path and into Redis.

`LogWriter.submit(record)` is synchronous, O(1), and never blocks or raises: the record goes on
an in-memory queue, or — when the queue is full — straight into a JSON-lines spool file. A
background task drains the queue into Redis, `batch_size` records per round trip: one EVALSHA of a
small Lua script that XADDs each record and SETs its index key (several times faster than a redis-py
pipeline, see _APPEND_BATCH_LUA), or — where scripting is not allowed — one pipeline of XADDs plus an
MSET. When Redis fails (down, timing out, loading, read-only, out of
memory) the batch and everything queued after it go to the spool (fsync per batch), and the task
pings Redis every `retry_interval`. When Redis answers again the spool is replayed first, oldest
file first, in order, then the queue. Replay is at-least-once: a crash mid-replay (or a batch cut
off halfway) can write a record twice, so records carry their own id in `fields` and readers
dedupe by it. Records Redis refuses for good (e.g. WRONGTYPE) are moved to `rejected.jsonl`.

Spool directory layout (one writer process per directory; a lock file enforces it):
    spool.jsonl                  records spooled since the last rotation (appended)
    replay-<ns>.jsonl[.offset]   rotated spool files awaiting replay, and how far replay got
    rejected.jsonl               records Redis refused, with the error

`submit` must be called from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import prometheus_client
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger("secondstage.logwriter")

# Errors after which the same write can succeed later: spool and retry, never drop.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # includes BusyLoadingError, AuthenticationError
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # failover in progress
    redis.exceptions.OutOfMemoryError,  # maxmemory reached; may clear
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    TimeoutError,  # our own asyncio.timeout around each operation
    OSError,
)
# Reply prefixes of refusals that go away on their own (plain ResponseError in redis-py).
_TRANSIENT_REPLIES = ("LOADING", "BUSY", "MISCONF", "OOM", "READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN")


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TRANSIENT_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


@dataclass(slots=True)
class Record:
    """One stream entry to append, optionally with a key to SET for lookup by id."""

    stream: str
    fields: dict[str, str]
    index_key: str | None = None
    index_value: str | None = None
    maxlen: int | None = None

    def __post_init__(self) -> None:
        if (self.index_key is None) != (self.index_value is None):
            raise ValueError(
                f"Record index_key={self.index_key!r} and index_value=<{type(self.index_value).__name__}> "
                "must be given together (both set, or both None)"
            )

    def to_json(self) -> str:
        return json.dumps(
            {"s": self.stream, "f": self.fields, "k": self.index_key, "v": self.index_value, "m": self.maxlen},
            separators=(",", ":"),
            ensure_ascii=False,
            default=str,  # a stray non-str value must not make the record unspoolable
        )

    @classmethod
    def from_json(cls, line: bytes | str) -> Record:
        d = json.loads(line)
        return cls(d["s"], d["f"], d.get("k"), d.get("v"), d.get("m"))


class _Spool:
    """The spool directory: an append-only active file, rotated into replay files that are consumed in order."""

    ACTIVE = "spool.jsonl"

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.records = 0
        """Records on disk not yet replayed (active file + replay files past their offsets)."""
        self._fd: int | None = None
        # Generations, not a flag: appends go on while an fsync runs in a thread.
        self._appended = 0
        self._synced = 0
        self._active_records = 0
        self._lock_fd: int | None = None

    @property
    def active(self) -> Path:
        return self.dir / self.ACTIVE

    def lock(self) -> None:
        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"log spool directory {self.dir} is in use by another LogWriter (lock {self.dir / 'lock'}); "
                "give each process its own spool_dir"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def append(self, records: list[Record]) -> None:
        """Write records to the active file (reaches the OS now; `fsync` makes it durable)."""
        if self._fd is None:
            self.lock()
            self._fd = os.open(self.active, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        data = "".join([r.to_json() + "\n" for r in records]).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.records += len(records)
        self._active_records += len(records)
        self._appended += 1

    @property
    def dirty(self) -> bool:
        return self._appended != self._synced

    async def fsync(self) -> None:
        # Off the loop: an fsync can take tens of ms and the loop is serving requests.
        if self.dirty and self._fd is not None:
            generation = self._appended
            await asyncio.to_thread(os.fsync, self._fd)
            self._synced = max(self._synced, generation)

    def fsync_now(self) -> None:
        if self.dirty and self._fd is not None:
            generation = self._appended
            os.fsync(self._fd)
            self._synced = generation

    def close(self) -> None:
        self.fsync_now()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.unlock()

    def rotate(self) -> None:
        """Turn the active file into a replay file (new spooled records start a fresh active file).

        Call after `fsync`; synchronous so no append can interleave.
        """
        self.fsync_now()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.active.exists() and self.active.stat().st_size > 0:
            os.rename(self.active, self.dir / f"replay-{time.time_ns():020d}.jsonl")
            _fsync_dir(self.dir)
        self._active_records = 0

    def replay_files(self) -> list[Path]:
        return sorted(self.dir.glob("replay-*.jsonl"))

    @property
    def active_records(self) -> int:
        return self._active_records

    @staticmethod
    def offset(path: Path) -> int:
        try:
            return int(path.with_suffix(".offset").read_text())
        except (OSError, ValueError):
            return 0  # missing or torn: replay from the start (duplicates, never loss)

    @staticmethod
    def save_offset(path: Path, offset: int) -> None:
        tmp = path.with_suffix(".offset.tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, path.with_suffix(".offset"))

    def finish(self, path: Path) -> None:
        path.unlink()
        with contextlib.suppress(FileNotFoundError):
            path.with_suffix(".offset").unlink()

    def batches(self, path: Path, batch_size: int) -> Iterator[tuple[list[bytes], int]]:
        """Raw lines of a replay file from its saved offset, `batch_size` at a time, with the offset after each."""
        with open(path, "rb") as f:
            f.seek(self.offset(path))
            while lines := list(itertools.islice(f, batch_size)):
                yield lines, f.tell()

    def scan(self) -> tuple[int, list[str]]:
        """Count the records awaiting replay and collect their index keys (run at start, off the loop)."""
        count, keys = 0, []
        for path in self.replay_files():
            for lines, _ in self.batches(path, 4096):
                for line in lines:
                    if not line.strip():
                        continue
                    count += 1
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        key = json.loads(line).get("k")
                        if key:
                            keys.append(key)
        return count, keys

    def reject(self, items: list[tuple[str, str]]) -> None:
        """Keep refused records (raw JSON line, error) for an operator; they are not replayed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "rejected.jsonl", "a", encoding="utf-8") as f:
            for raw, error in items:
                f.write(json.dumps({"error": error, "record": raw}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _describe(exc: BaseException) -> str:
    # redis-py's repr() of its errors drops the message. A ResponseError's text starts with Redis's own
    # error code (WRONGTYPE, OOM, ...), which is what _TRANSIENT_REPLIES matches.
    if isinstance(exc, redis.exceptions.ResponseError) and type(exc) is redis.exceptions.ResponseError:
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


_MSGPACK = msgspec.msgpack.Encoder()


def _index_value(r: Record) -> str | int | bool:
    """The index value, or the 1-based position of the field value it is (same object) in the flat field list."""
    if r.index_value is None:
        return False
    for position, value in enumerate(r.fields.values()):
        if value is r.index_value:
            return 2 * position + 2
    return r.index_value


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


# Appends a whole batch in one round trip: redis-py spends 20-40 µs of Python per pipelined command, so a pipeline
# of one XADD per record tops out near 10-20k records/s; one EVALSHA per batch moves that work into Redis.
# ARGV[1]: msgpack array of [stream, maxlen or false, [field, value, ...], index_key or false, index_value or false]
# (false, not nil: nil would punch holes in Lua arrays). An index_value that is a number is the 1-based position of
# that value in the field list, so a completion's JSON, both a stream field and the lookup key's value, is sent once.
# msgpack, not JSON: the values are JSON text themselves and would be escaped again (most of the writer's CPU).
# Returns a flat array {position, error, ...} of the records Redis refused (1-based positions).
_APPEND_BATCH_LUA = """
local batch = cmsgpack.unpack(ARGV[1])
local refused = {}
for i, r in ipairs(batch) do
  local reply
  if r[2] then
    reply = redis.pcall('XADD', r[1], 'MAXLEN', '~', r[2], '*', unpack(r[3]))
  else
    reply = redis.pcall('XADD', r[1], '*', unpack(r[3]))
  end
  if type(reply) == 'table' and reply.err then
    refused[#refused + 1] = i
    refused[#refused + 1] = reply.err
  elseif r[4] then
    local value = r[5]
    if type(value) == 'number' then value = r[3][value] end
    reply = redis.pcall('SET', r[4], value)
    if type(reply) == 'table' and reply.err then
      refused[#refused + 1] = i
      refused[#refused + 1] = 'index SET: ' .. reply.err
    end
  end
end
return refused
"""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LogWriter:
    """Queue → Redis in batches, with a disk spool for when Redis is away. See the module docstring.

    The writer owns the client `client_factory` returns: it turns off the client's own retries
    (the writer retries, and a retrying client would hide an outage for seconds) and closes it on stop.
    `op_timeout` bounds each Redis call; `pending_cap` bounds is_pending's memory (default 10 × max_queue,
    oldest forgotten first); `batch_script=False` writes with plain pipelines instead of the Lua script.
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
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        for name, value in (("max_queue", max_queue), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"LogWriter {name}={value} must be at least 1")
        for name, fvalue in (("retry_interval", retry_interval), ("op_timeout", op_timeout)):
            if fvalue <= 0:
                raise ValueError(f"LogWriter {name}={fvalue} must be positive (seconds)")
        self._client_factory = client_factory
        self._spool = _Spool(Path(spool_dir))
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
        self._client: redis.asyncio.Redis | None = None
        self._batch_script = batch_script
        self._script: Any = None  # redis-py AsyncScript while the batch-append script is in use
        self._down = False
        self._down_since = 0.0
        self._closed = False
        self.written_total = 0
        self.spooled_total = 0
        self.write_errors_total = 0

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
        self._m_errors = prometheus_client.Counter(
            "secondstage_log_write_errors",
            "Failed Redis writes (whole batches) and records Redis refused.",
            registry=reg,
        )

    # --- request path -------------------------------------------------------------------------

    def submit(self, record: Record) -> None:
        """Hand a record over; returns at once and never raises (failures are logged and counted)."""
        try:
            if record.index_key is not None:
                self._add_pending(record.index_key)
            if len(self._queue) < self._max_queue and not self._closed:
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
        self._client = self._client_factory()
        # One immediate retry heals a pooled connection that Redis dropped while restarting.
        self._client.set_retry(Retry(NoBackoff(), 1))
        self._script = self._client.register_script(_APPEND_BATCH_LUA) if self._batch_script else None
        self._closed = False
        self._stop_requested.clear()
        self._task = asyncio.create_task(self._run(), name="secondstage-logwriter")
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
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    async def __aenter__(self) -> LogWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- drain task ----------------------------------------------------------------------------

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Only a bug or a failing spool disk gets here; records keep queueing and stop() spools them.
            log.error("log writer drain task died; records now wait for stop()", exc_info=task.exception())

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
                if await self._ping():
                    self._set_up()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._retry_interval):
                            await self._stop_requested.wait()
                    continue
            # At shutdown only the queue is flushed; the spool is safe on disk for the next start.
            if self._spool.records and not self._stop_requested.is_set() and not await self._replay():
                continue
            batch = self._take()
            if not batch:
                if self._stop_requested.is_set():
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Held here until written or spooled, so that stop() cancelling the write can spool it.
            self._inflight = batch
            try:
                await self._write(batch)
            except Exception as exc:
                if not _is_transient(exc):
                    raise
                self._spool_append(batch)
                self._inflight = None
                self._set_down(exc)
                continue
            self._inflight = None
            self._done_pending(batch)

    def _take(self) -> list[Record]:
        q = self._queue
        n = min(self._batch_size, len(q))
        return [q.popleft() for _ in range(n)]

    def _spool_append(self, records: list[Record]) -> None:
        self._spool.append(records)
        self.spooled_total += len(records)
        self._m_spooled.inc(len(records))

    async def _ping(self) -> bool:
        assert self._client is not None
        try:
            async with asyncio.timeout(self._op_timeout):
                await self._client.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            return False
        return True

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
                    if not _is_transient(exc):
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
            refusals = await self._send(batch)
        except Exception as exc:
            if _is_transient(exc):
                raise
            if len(batch) == 1:
                self._reject([(batch[0].to_json(), _describe(exc))])
                return
            # The batch could not even be sent (e.g. a field value that is not a str): find the culprits one by one.
            for record in batch:
                await self._write([record])
            return
        for _, error in refusals:
            if error.startswith(_TRANSIENT_REPLIES):
                raise redis.exceptions.ResponseError(error)
        if refusals:
            self._reject([(batch[i].to_json(), error) for i, error in refusals])
        self._count_written(len(batch) - len({i for i, _ in refusals}))

    async def _send(self, batch: list[Record]) -> list[tuple[int, str]]:
        """Send a batch; return (position in batch, error) for each record Redis refused."""
        if self._script is not None:
            payload = _MSGPACK.encode(
                [
                    [r.stream, False if r.maxlen is None else str(r.maxlen), [x for kv in r.fields.items() for x in kv],
                     r.index_key or False, _index_value(r)]
                    for r in batch
                ]
            )  # fmt: skip
            try:
                async with asyncio.timeout(self._op_timeout):
                    reply = await self._script(args=[payload])
            except redis.exceptions.ResponseError as exc:
                if _is_transient(exc):
                    raise
                # E.g. an ACL without +@scripting on a managed Redis: plain pipelines do the same, slower.
                log.warning("cannot run the batch-append script (%s); writing with plain pipelines", _describe(exc))
                self._script = None
            else:
                return [(int(reply[j]) - 1, _text(reply[j + 1])) for j in range(0, len(reply), 2)]
        return await self._pipeline(batch)

    async def _pipeline(self, batch: list[Record]) -> list[tuple[int, str]]:
        assert self._client is not None
        pipe = self._client.pipeline(transaction=False)
        index: list[str] = []
        for r in batch:
            if r.maxlen is None:
                args: list[Any] = ["XADD", r.stream, "*"]
            else:
                args = ["XADD", r.stream, "MAXLEN", "~", r.maxlen, "*"]
            for kv in r.fields.items():
                args.extend(kv)
            pipe.execute_command(*args)
            if r.index_key is not None:
                index.append(r.index_key)
                index.append(r.index_value)  # type: ignore[arg-type]  # set together (Record.__post_init__)
        if index:
            pipe.execute_command("MSET", *index)
        async with asyncio.timeout(self._op_timeout):
            results = await pipe.execute(raise_on_error=False)
        for res in results:
            if isinstance(res, Exception) and _is_transient(res):
                raise res
        refusals = [(i, _describe(res)) for i, res in enumerate(results[: len(batch)]) if isinstance(res, Exception)]
        if len(results) > len(batch) and isinstance(results[-1], Exception):  # the batch's MSET
            error = f"index SET: {_describe(results[-1])}"
            refusals.extend((i, error) for i, r in enumerate(batch) if r.index_key is not None)
        return refusals

    def _count_written(self, n: int) -> None:
        self.written_total += n
        self._m_written.inc(n)

    def _reject(self, items: list[tuple[str, str]]) -> None:
        self.write_errors_total += len(items)
        self._m_errors.inc(len(items))
        log.error(
            "Redis refused %d log records (first: %s); kept in %s",
            len(items),
            items[0][1],
            self._spool.dir / "rejected.jsonl",
        )
        self._spool.reject(items)
