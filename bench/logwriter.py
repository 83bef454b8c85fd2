"""Completion logging: records/s the LogWriter sustains into a real redis-server, and proof that none are lost.

    .venv/bin/python -m bench.logwriter [--quick] [--records 100000] [--passes 2] [--outage-records 30000]

1. throughput: `--records` completion records (~1.5 KB JSON each, built by the server's own Recorder with the
   server's retention on: one XADD MAXLEN ~ to the completions stream + one SET EX of the lookup key per
   completion, plus the age trim) submitted as fast as the bounded queue takes them (the producer waits while
   the queue is over half full, so nothing spools) into a fresh private redis-server per run (unix socket, AOF
   appendfsync always — the server's default). The writer's event loop runs on one core; redis-server is a
   separate process. Variants, run in alternating passes so that the machine's load hits each alike:
   - `one`: the server's writer (one batch in flight);
   - `two`: `concurrent_batches=2` (two batches at once on two connections: encoding overlaps Redis' work);
   - `small_index`: what fewer bytes would buy — the lookup key holds a 40-byte reference instead of a second
     copy of the record (a measurement only: serve and align still read the copy);
   After the `one` runs: bytes per completion in Redis (MEMORY USAGE of the stream and of the lookup keys) and
   redis `used_memory` per 100,000 completions.
2. outage: `--outage-records` at `--outage-rate`/s into a redis-server with appendfsync=always, SIGKILLed
   a third of the way through and restarted a second later. The writer spools to disk while Redis is down
   and replays when it is back.
Both runs read the stream back, dedupe by record id (delivery is at-least-once) and count missing ids,
duplicates and missing lookup keys. Writes bench/results/logwriter.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
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
from core.settings import CommonSettings
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
    """`n` completion records with the server's retention on (stream MAXLEN ~ and age trim, lookup-key TTL)."""
    sink = _Collect()
    common = CommonSettings()
    recorder = Recorder(
        sink, None, KEYS, recent=1, record_cls=Record, maxlen=common.stream_maxlen, ttl_s=common.retention_s
    )
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


async def throughput(
    records: list[Record], url: str, spool: Path, batch_size: int, max_queue: int, concurrent_batches: int = 1
) -> dict[str, Any]:
    writer = LogWriter(
        lambda: redis.asyncio.Redis.from_url(url),
        spool,
        max_queue=max_queue,
        batch_size=batch_size,
        concurrent_batches=concurrent_batches,
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
                # Not sleep(0): spinning would bill this process's CPU for the time the writer waits on Redis.
                await asyncio.sleep(0.001)
        writer.submit(record)
    await _drained(writer, records[-1], timeout=600)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    spooled = writer.spooled_total
    await writer.stop()
    redis_cpu = _redis_cpu(url) - redis_cpu0
    # Where the time goes: this process (the writer's loop) vs redis-server, in CPU seconds. On a loaded machine
    # the wall-clock rate mostly measures the wait for a core; records per CPU-second of the writer's process is
    # what one core sustains when it has it (Redis runs on another).
    return {
        "seconds": elapsed,
        "per_s": len(records) / elapsed,
        "spooled": spooled,
        "writer_cpu_s": cpu,
        "redis_cpu_s": redis_cpu,
        "writer_cpu_us_per_record": round(cpu / len(records) * 1e6, 2),
        "redis_cpu_us_per_record": round(redis_cpu / len(records) * 1e6, 2),
        "per_writer_cpu_s": round(len(records) / cpu),
    }


def small_index(records: list[Record]) -> list[Record]:
    """The same records with a 40-byte lookup value instead of a copy of the record (see the module docstring)."""
    return [Record(r.stream, r.fields, r.index_key, f"ref:{r.fields['id'][-36:]}", r.maxlen, r.ttl_s) for r in records]


def redis_memory(url: str, n: int, sample: list[str]) -> dict[str, Any]:
    """Bytes per completion in Redis (stream entry + lookup key) and used_memory per 100,000 completions."""
    client = redis.Redis.from_url(url)
    try:
        stream_bytes = int(client.memory_usage(KEYS.completions, samples=0) or 0)
        keys = [int(client.memory_usage(KEYS.completion(cid)) or 0) for cid in sample]
        info = client.info("memory")
        ttl = client.ttl(KEYS.completion(sample[0]))
        entries = client.xlen(KEYS.completions)
    finally:
        client.close()
    key_mean = sum(keys) / len(keys)
    return {
        "completions": n,
        "stream_entries": entries,
        "stream_bytes_per_completion": round(stream_bytes / entries),
        "lookup_key_bytes_per_completion": round(key_mean),
        "bytes_per_completion": round(stream_bytes / entries + key_mean),
        "used_memory_bytes": int(info["used_memory"]),
        "used_memory_per_100k_mib": round(int(info["used_memory"]) * 100_000 / n / 2**20, 1),
        "lookup_key_ttl_s": ttl,
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


VARIANTS = ("one", "two", "small_index")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20,000 records, one pass, a 5,000-record outage run")
    p.add_argument("--records", type=int, default=None, help="completion records per throughput run (100,000)")
    p.add_argument("--passes", type=int, default=None, help="alternating passes over the variants (2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=256, help="LogWriter batch_size")
    p.add_argument("--max-queue", type=int, default=10_000, help="LogWriter max_queue")
    p.add_argument("--outage-records", type=int, default=None, help="records in the Redis-restart run (30,000)")
    p.add_argument("--outage-rate", type=float, default=5_000.0, help="records/s submitted in the restart run")
    p.add_argument("--down-s", type=float, default=1.0, help="seconds Redis stays down")
    args = p.parse_args()
    args.records = args.records or (20_000 if args.quick else 100_000)
    args.passes = args.passes or (1 if args.quick else 2)
    args.outage_records = args.outage_records or (5_000 if args.quick else 30_000)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"--variants {sorted(unknown)}: unknown; choose from {', '.join(VARIANTS)}")
    for name in ("records", "batch_size", "max_queue", "outage_records", "passes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")

    work = short_tmpdir("ssbench-log-")
    out: dict[str, Any] = {"params": vars(args), "runs": []}
    try:
        console.print(f"building {args.records:,} records ...")
        records, ids = build_records(args.records)
        sizes = [len(r.fields["data"]) for r in records[:1000]]
        out["record_bytes_mean"] = sum(sizes) / len(sizes)
        inputs = {"one": records, "two": records, "small_index": small_index(records)}
        for k in range(args.passes):
            for variant in variants:
                run_dir = work / f"{variant}-{k}"
                with PrivateRedis(run_dir / "redis") as server:
                    tp = asyncio.run(
                        throughput(
                            inputs[variant],
                            server.url,
                            run_dir / "spool",
                            args.batch_size,
                            args.max_queue,
                            concurrent_batches=2 if variant == "two" else 1,
                        )
                    )
                    tp["check"] = read_back(server.url, ids)
                    if variant == "one" and "memory" not in out:
                        out["memory"] = redis_memory(server.url, args.records, sorted(ids)[:1000])
                tp.update(variant=variant, passes=k + 1, loadavg_1m=round(os.getloadavg()[0], 2))
                out["runs"].append(tp)
                console.print(
                    f"pass {k + 1} {variant}: {tp['per_s']:,.0f} completions/s (writer CPU {tp['writer_cpu_s']:.2f}s, "
                    f"redis CPU {tp['redis_cpu_s']:.2f}s, load {tp['loadavg_1m']}); missing {tp['check']['missing']}"
                )
                shutil.rmtree(run_dir, ignore_errors=True)
        out["variants"] = {
            v: {
                "per_s_median": statistics.median(r["per_s"] for r in out["runs"] if r["variant"] == v),
                "per_writer_cpu_s_median": statistics.median(
                    r["per_writer_cpu_s"] for r in out["runs"] if r["variant"] == v
                ),
                "redis_cpu_us_per_record_median": statistics.median(
                    r["redis_cpu_us_per_record"] for r in out["runs"] if r["variant"] == v
                ),
                "per_s_passes": [round(r["per_s"]) for r in out["runs"] if r["variant"] == v],
                "missing": sum(r["check"]["missing"] for r in out["runs"] if r["variant"] == v),
            }
            for v in variants
        }
        # The server's configuration is the summary's figure (bench/run_all.py reads "throughput").
        out["throughput"] = next(r for r in out["runs"] if r["variant"] == variants[0])
        out["throughput"]["per_s"] = out["variants"][variants[0]]["per_s_median"]

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

    t = Table(title=f"Log writer → redis-server (unix socket, AOF always), {args.records:,} records per run")
    for col in ("variant", "completions/s (median)", "passes", "vs one", "per writer CPU-s", "redis µs/rec", "missing"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    ref = out["variants"].get("one", {}).get("per_s_median")
    for v, r in out["variants"].items():
        t.add_row(
            v,
            fmt(r["per_s_median"], 0),
            ", ".join(f"{x:,}" for x in r["per_s_passes"]),
            f"x{r['per_s_median'] / ref:.2f}" if ref else "-",
            fmt(r["per_writer_cpu_s_median"], 0),
            fmt(r["redis_cpu_us_per_record_median"], 1),
            str(r["missing"]),
        )
    console.print(t)
    ot = out["outage"]
    console.print(
        f"SIGKILL+restart at {args.outage_rate:,.0f}/s: {ot['check']['unique_read']:,} of {ot['check']['written']:,} "
        f"read back, missing {ot['check']['missing']}, duplicates {ot['check']['duplicates']}, missing keys "
        f"{ot['check']['missing_index_keys']}; Redis killed at {ot.get('killed_at_s', 0):.2f}s, back at "
        f"{ot.get('restarted_at_s', 0):.2f}s, {ot['spooled']:,} records spooled, all drained at "
        f"{ot['drained_at_s']:.2f}s"
    )
    if mem := out.get("memory"):
        console.print(
            f"record ~{out['record_bytes_mean']:.0f} B of JSON; in Redis {mem['bytes_per_completion']:,} B per "
            f"completion (stream entry {mem['stream_bytes_per_completion']:,} + lookup key "
            f"{mem['lookup_key_bytes_per_completion']:,}); "
            f"used_memory {mem['used_memory_per_100k_mib']} MiB per 100,000 completions (retention: MAXLEN ~ "
            f"{CommonSettings().stream_maxlen:,}, keys expire after {mem['lookup_key_ttl_s']:,} s)"
        )
    out["goals"] = {
        "throughput_ge_20k_per_s": out["throughput"]["per_s"] >= 20_000,
        "no_loss": all(r["check"]["missing"] == 0 for r in out["runs"]) and ot["check"]["missing"] == 0,
    }
    console.print(f"goals: {out['goals']}")
    console.print(f"wrote {write_result('logwriter', out)}")
    from bench.plot import plot

    plot(["logwriter"])


if __name__ == "__main__":
    main()
