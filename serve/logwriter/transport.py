"""One Redis round trip per batch of log records, and which Redis errors are worth a retry.

`BatchTransport.send(batch)` appends a batch with one EVALSHA of a small Lua script that XADDs each
record and SETs its index key, applying each record's retention (stream MAXLEN and age, key TTL; see
_APPEND_BATCH_LUA for why), or — where scripting is not allowed, e.g.
an ACL without +@scripting on a managed Redis — with one pipeline of XADDs plus an MSET. It raises on
a failure after which the same write can succeed later (`is_transient`: down, timing out, loading,
read-only, out of memory) and returns the records Redis refused for good, which retrying cannot fix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from serve.logwriter.record import Record

log = logging.getLogger("secondstage.logwriter")

# Errors after which the same write can succeed later: spool and retry, never drop.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
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
TRANSIENT_REPLIES = ("LOADING", "BUSY", "MISCONF", "OOM", "READONLY", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN")


def is_transient(exc: BaseException) -> bool:
    """True for errors after which the same write can succeed later (spool and retry, never drop)."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(TRANSIENT_REPLIES)


def describe(exc: BaseException) -> str:
    # redis-py's repr() of its errors drops the message. A ResponseError's text starts with Redis's own
    # error code (WRONGTYPE, OOM, ...), which is what TRANSIENT_REPLIES matches.
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
# ARGV[1]: msgpack array of [stream, maxlen or false, [field, value, ...], index_key or false, index_value or false,
# ttl_s or false] (false, not nil: nil would punch holes in Lua arrays). An index_value that is a number is the
# 1-based position of that value in the field list, so a completion's JSON, both a stream field and the lookup key's
# value, is sent once. msgpack, not JSON: the values are JSON text themselves and would be escaped again (most of the
# writer's CPU). Retention: MAXLEN ~ on each XADD; the index key gets EX ttl_s; once per stream and batch, entries
# older than ttl_s are trimmed (XTRIM MINID ~, the cutoff from the server's clock, so a replayed spool trims by the
# age at replay). Approximate trimming (`~`) frees whole radix-tree nodes: cheap, and at most a node more is kept.
# Returns a flat array {position, error, ...} of the records Redis refused (1-based positions).
_APPEND_BATCH_LUA = """
local batch = cmsgpack.unpack(ARGV[1])
local refused = {}
local oldest = {}
for i, r in ipairs(batch) do
  if r[6] then oldest[r[1]] = r[6] end
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
    if r[6] then
      reply = redis.pcall('SET', r[4], value, 'EX', r[6])
    else
      reply = redis.pcall('SET', r[4], value)
    end
    if type(reply) == 'table' and reply.err then
      refused[#refused + 1] = i
      refused[#refused + 1] = 'index SET: ' .. reply.err
    end
  end
end
if next(oldest) then
  local now = tonumber(redis.call('TIME')[1])
  for stream, ttl in pairs(oldest) do
    redis.pcall('XTRIM', stream, 'MINID', '~', math.max(0, now - tonumber(ttl)) * 1000)
  end
end
return refused
"""


class BatchTransport:
    """Writes batches of records through one Redis client, which it owns (closed by `aclose`).

    The client's own retries are cut to one immediate retry: the writer retries, and a retrying
    client would hide an outage for seconds. `op_timeout` bounds each Redis call; `use_script=False`
    writes with plain pipelines instead of the Lua script.
    """

    def __init__(self, client: redis.asyncio.Redis, *, op_timeout: float, use_script: bool = True) -> None:
        self.client = client
        self._op_timeout = op_timeout
        # One immediate retry heals a pooled connection that Redis dropped while restarting.
        client.set_retry(Retry(NoBackoff(), 1))
        self._script: Any = client.register_script(_APPEND_BATCH_LUA) if use_script else None  # redis-py AsyncScript

    async def aclose(self) -> None:
        await self.client.aclose()

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self._op_timeout):
                await self.client.ping()
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            return False
        return True

    async def send(self, batch: list[Record]) -> list[tuple[int, str]]:
        """Send a batch; return (position in batch, error) for each record Redis refused for good.

        Raises on a transient failure, also when Redis refused a single record for a transient reason
        (the caller keeps the whole batch for a retry).
        """
        refusals = await self._send(batch)
        for _, error in refusals:
            if error.startswith(TRANSIENT_REPLIES):
                raise redis.exceptions.ResponseError(error)
        return refusals

    async def _send(self, batch: list[Record]) -> list[tuple[int, str]]:
        if self._script is not None:
            payload = _MSGPACK.encode(
                [
                    [r.stream, False if r.maxlen is None else str(r.maxlen), [x for kv in r.fields.items() for x in kv],
                     r.index_key or False, _index_value(r), False if r.ttl_s is None else str(r.ttl_s)]
                    for r in batch
                ]
            )  # fmt: skip
            try:
                async with asyncio.timeout(self._op_timeout):
                    reply = await self._script(args=[payload])
            except redis.exceptions.ResponseError as exc:
                if is_transient(exc):
                    raise
                # E.g. an ACL without +@scripting on a managed Redis: plain pipelines do the same, slower.
                log.warning("cannot run the batch-append script (%s); writing with plain pipelines", describe(exc))
                self._script = None
            else:
                return [(int(reply[j]) - 1, _text(reply[j + 1])) for j in range(0, len(reply), 2)]
        return await self._pipeline(batch)

    async def _pipeline(self, batch: list[Record]) -> list[tuple[int, str]]:
        pipe = self.client.pipeline(transaction=False)
        index: list[str] = []
        expiring: list[tuple[str, int]] = []
        oldest: dict[str, int] = {}
        for r in batch:
            if r.ttl_s is not None:
                oldest[r.stream] = r.ttl_s
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
                if r.ttl_s is not None:
                    expiring.append((r.index_key, r.ttl_s))
        if index:
            pipe.execute_command("MSET", *index)
        # After the MSET: EXPIRE and XTRIM replies are not checked (a failed trim costs space, not records).
        for key, ttl_s in expiring:
            pipe.execute_command("EXPIRE", key, ttl_s)
        for stream, ttl_s in oldest.items():
            pipe.execute_command("XTRIM", stream, "MINID", "~", max(0, int(time.time()) - ttl_s) * 1000)
        async with asyncio.timeout(self._op_timeout):
            results = await pipe.execute(raise_on_error=False)
        for res in results:
            if isinstance(res, Exception) and is_transient(res):
                raise res
        refusals = [(i, describe(res)) for i, res in enumerate(results[: len(batch)]) if isinstance(res, Exception)]
        mset = len(batch) if index else None
        if mset is not None and isinstance(results[mset], Exception):  # the batch's MSET
            error = f"index SET: {describe(results[mset])}"
            refusals.extend((i, error) for i, r in enumerate(batch) if r.index_key is not None)
        return refusals
