"""The bounded async writer that takes log records off the request path and into Redis.

`LogWriter.submit(record)` is synchronous, O(1), and never blocks or raises: the record goes on
an in-memory queue, or — when the queue is full — straight into a JSON-lines spool file. A
background task drains the queue into Redis, `batch_size` records per round trip: one EVALSHA of a
small Lua script that XADDs each record and SETs its index key (several times faster than a redis-py
pipeline), or — where scripting is not allowed — one pipeline of XADDs plus an MSET. When Redis fails
(down, timing out, loading, read-only, out of memory) the batch and everything queued after it go to
the spool (fsync per batch), and the task pings Redis every `retry_interval`. When Redis answers
again the spool is replayed first, oldest file first, in order, then the queue. Replay is
at-least-once: a crash mid-replay (or a batch cut off halfway) can write a record twice, so records
carry their own id in `fields` and readers dedupe by it. Records Redis refuses for good (e.g.
WRONGTYPE) are moved to `rejected.jsonl`.

One concept per module:
    record.py      `Record`, one stream entry, and its spool line (JSON)
    spool.py       the spool directory: append, fsync, rotate, replay in order, rejected records
    transport.py   one Redis round trip per batch (Lua script, pipeline fallback) and which errors are transient
    writer.py      `LogWriter`: the queue, the drain task, outages and replay

`submit` must be called from the event loop's thread.
"""

from serve.logwriter.record import Record
from serve.logwriter.writer import LogWriter

__all__ = ["LogWriter", "Record"]
