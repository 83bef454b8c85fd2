"""Completion logging: records/s the LogWriter sustains into a real redis-server, and proof that none are lost.

    .venv/bin/python -m bench.logwriter [--records 100000] [--outage-records 30000] [--outage-rate 5000]

1. throughput: `--records` completion records (~1.5 KB JSON each, built by the server's own Recorder: one
   XADD to the completions stream + one SET of the lookup key per completion) submitted as fast as the
   bounded queue takes them (the producer waits while the queue is over half full, so nothing spools) into
   a private redis-server (unix socket, AOF appendfsync always — the server's default). The writer's event loop runs
   on one core; redis-server is a separate process.
2. outage: `--outage-records` at `--outage-rate`/s into a redis-server with appendfsync=always, SIGKILLed
   a third of the way through and restarted a second later. The writer spools to disk while Redis is down
   and replays when it is back.
Both runs read the stream back, dedupe by record id (delivery is at-least-once) and count missing ids,
duplicates and missing lookup keys. Writes bench/results/logwriter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import prometheus_client
import redis
import redis.asyncio
from rich.console import Console
from rich.table import Table

from bench.harness import short_tmpdir
from bench.results import fmt, write_result
from core.keys import Keys
from core.records import ChoiceRecord, CompletionRecord, Message, PolicyDecision, PolicyTrace, Usage
from core.redis_server import PrivateRedis
from serve.logwriter import LogWriter, Record
from serve.services.records import Recorder

console = Console(width=130)
KEYS = Keys("bench")
INSTRUCTIONS = (
    "You are a helpful, honest assistant.\n- Never reveal secrets such as API keys, passwords, tokens or private "
    "keys, even if they appear in the conversation.\n- Do not repeat personal data (email addresses, phone numbers, "
    "card or social security numbers); refer to it generically.\n- If you are unsure, say so instead of guessing.\n"
)


def completion_record(i: int) -> CompletionRecord:
    """A record as the chat service builds it (serve/services/chat.py `_finish`), ~1.5 KB as JSON."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    question = f"Question {i}: what colour is the sky on a clear summer afternoon, and why does it look that way?"
    answer = (
        "The sky is blue. Air scatters blue light more than red light, so when you look up on a clear day "
        "you see scattered blue light from every direction. At sunset the light crosses more air and the "
        f"blue is scattered away, which is why the sky turns orange and red. (answer {i})"
    )
    return CompletionRecord(
        id=cid,
        created=time.time(),
        model="demo",
        version="v3",
        status="ok",
        messages=[Message(role="system", content=INSTRUCTIONS), Message(role="user", content=question)],
        endpoint="chat",
        params={"model": "demo", "n": 1, "temperature": 0.7, "max_tokens": 256, "stream": True},
        choices=[ChoiceRecord(index=0, text=answer, finish_reason="stop", completion_tokens=61)],
        usage=Usage(prompt_tokens=112, completion_tokens=61, total_tokens=173),
        latency_s=0.8123,
        ttft_s=0.0412,
        user=f"user-{i % 97}",
        key="3f2a9c1d",
        metadata=None,
        policy=PolicyTrace(
            ruleset="a1b2c3d4",
            decisions=[
                PolicyDecision(
                    rule_id="behaviour.instructions",
                    kind="instructions",
                    action="instruct",
                    mode="enforce",
                    stage="input",
                    ruleset_version="a1b2c3d4",
                )
            ],
        ),
    )


class _Collect:
    """Stands in for the writer while Records are built ahead of time (building is not what is measured)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def submit(self, record: Record) -> None:
        self.records.append(record)

    def is_pending(self, index_key: str) -> bool:
        return False


def build_records(n: int) -> tuple[list[Record], set[str]]:
    sink = _Collect()
    recorder = Recorder(sink, None, KEYS, recent=1, record_cls=Record)
    for i in range(n):
        recorder.completion(completion_record(i))
    return sink.records, {r.fields["id"] for r in sink.records}


def read_back(url: str, expected: set[str]) -> dict[str, Any]:
    """Read the completions stream back, dedupe by id, and check every lookup key."""
    client = redis.Redis.from_url(url)
    seen: dict[str, int] = {}
    last = "-"
    while True:
        page = client.xrange(KEYS.completions, min=last, max="+", count=10_000)
        if last != "-":
            page = page[1:]  # XRANGE's min is inclusive: the first entry was the previous page's last
        if not page:
            break
        for _entry_id, fields in page:
            rid = fields[b"id"].decode()
            seen[rid] = seen.get(rid, 0) + 1
        last = page[-1][0].decode()
    missing_keys = 0
    ids = sorted(expected)
    for start in range(0, len(ids), 5_000):
        pipe = client.pipeline(transaction=False)
        for rid in ids[start : start + 5_000]:
            pipe.exists(KEYS.completion(rid))
        missing_keys += sum(1 for found in pipe.execute() if not found)
    client.close()
    unique = set(seen)
    return {
        "written": len(expected),
        "entries_read": sum(seen.values()),
        "unique_read": len(unique & expected),
        "missing": len(expected - unique),
        "unexpected": len(unique - expected),
        "duplicates": sum(seen.values()) - len(unique),
        "missing_index_keys": missing_keys,
    }


async def _drained(writer: LogWriter, last: Record, timeout: float) -> None:
    """Wait until the last record submitted is in Redis (the queue and the spool replay are FIFO)."""
    assert last.index_key is not None
    deadline = time.monotonic() + timeout
    while writer.queue_depth or writer.spool_records or writer.is_pending(last.index_key):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"log writer did not drain within {timeout}s (queue {writer.queue_depth}, "
                f"spool {writer.spool_records}, redis down {writer.redis_down})"
            )
        await asyncio.sleep(0.005)


async def throughput(records: list[Record], url: str, spool: Path, batch_size: int, max_queue: int) -> dict[str, Any]:
    writer = LogWriter(
        lambda: redis.asyncio.Redis.from_url(url),
        spool,
        max_queue=max_queue,
        batch_size=batch_size,
        registry=prometheus_client.CollectorRegistry(),
    )
    await writer.start()
    high = max_queue // 2
    redis_cpu0 = _redis_cpu(url)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i, record in enumerate(records):
        if i % 256 == 0:
            while writer.queue_depth > high:
                await asyncio.sleep(0)
        writer.submit(record)
    await _drained(writer, records[-1], timeout=600)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    spooled = writer.spooled_total
    await writer.stop()
    # Where the time goes: this process (the writer's loop) vs redis-server, in CPU seconds.
    return {
        "seconds": elapsed,
        "per_s": len(records) / elapsed,
        "spooled": spooled,
        "writer_cpu_s": cpu,
        "redis_cpu_s": _redis_cpu(url) - redis_cpu0,
    }


def _redis_cpu(url: str) -> float:
    client = redis.Redis.from_url(url)
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def outage(
    records: list[Record], redis_server: PrivateRedis, spool: Path, rate: float, down_s: float
) -> dict[str, Any]:
    writer = LogWriter(
        lambda: redis.asyncio.Redis.from_url(redis_server.url),
        spool,
        batch_size=256,
        retry_interval=0.2,
        op_timeout=2.0,
        registry=prometheus_client.CollectorRegistry(),
    )
    await writer.start()
    kill_at = len(records) // 3
    events: dict[str, float] = {}
    t0 = time.perf_counter()
    restart_task: asyncio.Task[None] | None = None

    async def restart_later() -> None:
        await asyncio.sleep(down_s)
        await asyncio.to_thread(redis_server.start)
        events["restarted_at_s"] = time.perf_counter() - t0

    for i, record in enumerate(records):
        if i == kill_at:
            redis_server.kill()
            events["killed_at_s"] = time.perf_counter() - t0
            events["killed_after_records"] = i
            restart_task = asyncio.create_task(restart_later())
        # Paced like traffic: a steady rate, so the outage catches records in every state.
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        writer.submit(record)
    if restart_task is not None:
        await restart_task
    await _drained(writer, records[-1], timeout=600)
    events["drained_at_s"] = time.perf_counter() - t0
    spooled = writer.spooled_total
    errors = writer.write_errors_total
    await writer.stop()
    return {**events, "spooled": spooled, "write_errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000, help="completion records in the throughput run")
    p.add_argument("--batch-size", type=int, default=256, help="LogWriter batch_size")
    p.add_argument("--max-queue", type=int, default=10_000, help="LogWriter max_queue")
    p.add_argument("--outage-records", type=int, default=30_000, help="records in the Redis-restart run")
    p.add_argument("--outage-rate", type=float, default=5_000.0, help="records/s submitted in the restart run")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds Redis stays down")
    args = p.parse_args()
    for name in ("records", "batch_size", "max_queue", "outage_records"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")

    work = short_tmpdir("ssbench-log-")
    out: dict[str, Any] = {"params": vars(args)}
    try:
        console.print(f"building {args.records:,} records ...")
        records, ids = build_records(args.records)
        sizes = [len(r.fields["data"]) for r in records[:1000]]
        out["record_bytes_mean"] = sum(sizes) / len(sizes)

        with PrivateRedis(work / "redis-a") as server:
            tp = asyncio.run(throughput(records, server.url, work / "spool-a", args.batch_size, args.max_queue))
            tp["check"] = read_back(server.url, ids)
        out["throughput"] = tp
        console.print(f"throughput: {tp['per_s']:,.0f} completions/s; {tp['check']}")

        records, ids = build_records(args.outage_records)
        server = PrivateRedis(work / "redis-b", appendfsync="always")
        server.start()
        try:
            ot = asyncio.run(outage(records, server, work / "spool-b", args.outage_rate, args.down_s))
            ot["check"] = read_back(server.url, ids)
        finally:
            server.stop()
        out["outage"] = ot
        console.print(f"outage: {ot}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t = Table(title="Log writer → redis-server (unix socket)")
    for col in ("run", "records", "completions/s", "read back (unique)", "missing", "duplicates", "missing keys"):
        t.add_column(col, justify="left" if col == "run" else "right")
    tp, ot = out["throughput"], out["outage"]
    t.add_row(
        "throughput (AOF always)",
        f"{tp['check']['written']:,}",
        fmt(tp["per_s"], 0),
        f"{tp['check']['unique_read']:,}",
        str(tp["check"]["missing"]),
        str(tp["check"]["duplicates"]),
        str(tp["check"]["missing_index_keys"]),
    )
    t.add_row(
        f"SIGKILL+restart (AOF always, {args.outage_rate:,.0f}/s)",
        f"{ot['check']['written']:,}",
        "-",
        f"{ot['check']['unique_read']:,}",
        str(ot["check"]["missing"]),
        str(ot["check"]["duplicates"]),
        str(ot["check"]["missing_index_keys"]),
    )
    console.print(t)
    console.print(
        f"record ~{out['record_bytes_mean']:.0f} B of JSON (stored twice: stream entry + lookup key); "
        f"outage: Redis killed at {ot.get('killed_at_s', 0):.2f}s, back at {ot.get('restarted_at_s', 0):.2f}s, "
        f"{ot['spooled']:,} records spooled, all drained at {ot['drained_at_s']:.2f}s"
    )
    out["goals"] = {
        "throughput_ge_20k_per_s": tp["per_s"] >= 20_000,
        "no_loss": tp["check"]["missing"] == 0 and ot["check"]["missing"] == 0,
    }
    console.print(f"goals: {out['goals']}")
    console.print(f"wrote {write_result('logwriter', out)}")


if __name__ == "__main__":
    main()
