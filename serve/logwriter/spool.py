"""The log writer's spool: records kept on local disk while Redis is away, replayed in order.

Spool directory layout (one writer process per directory; a lock file enforces it):
    spool.jsonl                  records spooled since the last rotation (appended)
    replay-<ns>.jsonl[.offset]   rotated spool files awaiting replay, and how far replay got
    rejected.jsonl               records Redis refused, with the error

Each line is a `Record.to_json()`. Appends reach the OS at once; `fsync` (run off the event loop)
makes them durable. A missing or torn offset file replays its file from the start: duplicates,
never loss.

The spool is capped (`max_bytes`, the active and replay files together): a long outage must not fill
the disk the server and its Redis share. Past the cap new records are dropped, never silently:
`append` returns how many it kept (the writer counts the rest in `secondstage_log_records_dropped_total`),
`dropped` totals them, and an error is logged at most every `DROP_LOG_INTERVAL_S`.
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
from collections.abc import Iterator
from pathlib import Path

from serve.logwriter.record import Record

log = logging.getLogger("secondstage.logwriter")

DROP_LOG_INTERVAL_S = 10.0


class Spool:
    """The spool directory: an append-only active file, rotated into replay files that are consumed in order."""

    ACTIVE = "spool.jsonl"

    def __init__(self, directory: Path, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"Spool max_bytes={max_bytes} must be at least 1 (or None for no cap)")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dropped = 0
        """Records refused because the spool was at `max_bytes`."""
        self._bytes: int | None = None  # on disk in the active and replay files; counted on first need
        self._dropped_unlogged = 0
        self._drop_logged_at = -DROP_LOG_INTERVAL_S
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

    def append(self, records: list[Record]) -> int:
        """Write records to the active file (reaches the OS now; `fsync` makes it durable).

        Returns how many were written: those that would take the spool past `max_bytes` are dropped.
        """
        if self._fd is None:
            self.lock()
            self._fd = os.open(self.active, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        lines = [(r.to_json() + "\n").encode() for r in records]
        if self.max_bytes is not None:
            room = self.max_bytes - self.size
            kept = 0
            for line in lines:
                if len(line) > room:
                    break
                room -= len(line)
                kept += 1
            if kept < len(lines):
                self._drop(len(lines) - kept)
                lines = lines[:kept]
            if not lines:
                return 0
        data = b"".join(lines)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._bytes = self.size + len(data)
        self.records += len(lines)
        self._active_records += len(lines)
        self._appended += 1
        return len(lines)

    @property
    def size(self) -> int:
        """Bytes on disk in the active and replay files."""
        if self._bytes is None:
            files = [self.active, *self.replay_files()]
            self._bytes = sum(p.stat().st_size for p in files if p.exists())
        return self._bytes

    def _drop(self, n: int) -> None:
        self.dropped += n
        self._dropped_unlogged += n
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_INTERVAL_S:
            log.error(
                "log spool %s is full (%d bytes, cap %d): dropped %d log records (%d in all); "
                "bring Redis back or raise SECONDSTAGE_SPOOL_MAX_MB",
                self.dir, self.size, self.max_bytes, self._dropped_unlogged, self.dropped,
            )  # fmt: skip
            self._dropped_unlogged = 0
            self._drop_logged_at = now

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
        if self._bytes is not None:
            self._bytes = max(0, self._bytes - path.stat().st_size)
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
        # backslashreplace: a lone surrogate in an error text is kept as its JSON escape, never a write error.
        with open(self.dir / "rejected.jsonl", "a", encoding="utf-8", errors="backslashreplace") as f:
            for raw, error in items:
                f.write(json.dumps({"error": error, "record": raw}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
