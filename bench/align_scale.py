"""Align against the amount of feedback: dataset build from Redis, and whole `align run`s, in time and peak memory.

    .venv/bin/python -m bench.align_scale [--quick] [--sizes 100,1000,10000] [--max-steps 10] [--passes 2]

Feedback events (half corrections → DPO pairs, half thumbs → KTO rows, each on its own completion, from 500
API keys so the per-identity cap does not bite) are written to a private redis-server the way serve writes
them (typed records, completion lookup keys). Then:

1. dataset build, in this process: `FeedbackReader.read()` (a page at a time) + `build_datasets()` at each
   size, in alternating passes; wall time and the Python heap's peak (tracemalloc) — what grows with rows;
2. `secondstage align run --json` as an operator runs it (a subprocess per size, on the demo model, its own
   Redis prefix and var/): wall time, the outcome and gate, and the process's peak RSS (wait4). Training is
   capped at `--max-steps` optimizer steps per phase (SECONDSTAGE_MAX_STEPS): on 2 shared cores the default
   schedule (6 epochs over every pair) would take hours at 10,000 rows, and what this run measures is how the
   rest of the run scales (reading, tokenising, the gate);
3. `--goal-events` (200) with the default training schedule: feedback → gated version, the issue's ≤ 2 min
   goal (full mode only). --quick: the build at 100 and 1,000 events and one run at 100 events, 2 steps.

Prints tables; writes bench/results/align_scale.json and bench/results/align_scale.png. Figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from align.datasets import build_datasets
from align.feedback import FeedbackReader
from bench.harness import ROOT, ensure_demo_model, short_tmpdir
from bench.results import write_result
from core.keys import Keys
from core.records import ChoiceRecord, CompletionRecord, FeedbackRecord, Message, Usage, encode
from core.redis_server import PrivateRedis

console = Console(width=130)
TOPICS = ["the sky", "tides", "rain", "bread", "bees", "volcanoes", "ice", "copper", "owls", "maps", "clocks", "tea"]


def write_feedback(client: redis.Redis, keys: Keys, n: int) -> None:
    """`n` feedback events, each on its own completion: even ones correct the answer, odd ones are thumbs."""
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        topic = TOPICS[i % len(TOPICS)]
        completion = CompletionRecord(
            id=cid,
            created=now,
            model="demo",
            version="base",
            status="ok",
            messages=[Message(role="user", content=f"Question {i}: tell me one fact about {topic}.")],
            params={"temperature": 0.0, "n": 1},
            choices=[
                ChoiceRecord(index=0, text=f"{topic} is a thing ({i}).", finish_reason="stop", completion_tokens=8)
            ],
            usage=Usage(prompt_tokens=12, completion_tokens=8, total_tokens=20),
            latency_s=0.1,
            key=f"k-{i % 500}",
        )
        data = encode(completion)
        pipe.set(keys.completion(cid), data)
        pipe.xadd(keys.completions, {"schema": completion.schema, "id": cid, "data": data})
        signal: dict[str, Any] = (
            {"correction": f"Arr, matey! {topic.capitalize()} is worth knowing about ({i})."}
            if i % 2 == 0
            else {"thumbs": "up" if i % 4 == 1 else "down"}
        )
        fb = FeedbackRecord(id=f"fb-{uuid.uuid4().hex}", completion_id=cid, created=now, key=f"k-{i % 500}", **signal)
        pipe.xadd(keys.feedback, {"schema": fb.schema, "id": fb.id, "completion_id": cid, "data": encode(fb)})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def dataset_build(client: redis.Redis, keys: Keys, n: int) -> dict[str, Any]:
    reader = FeedbackReader(client, keys, max_rows_per_user=10**6, max_rows=10**6)
    tracemalloc.start()
    t0 = time.perf_counter()
    batch = reader.read(consume=False)
    data = build_datasets(batch)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "events": n,
        "seconds": elapsed,
        "peak_mib": peak / 2**20,
        "dpo_rows": len(data.dpo_rows),
        "kto_rows": len(data.kto_rows),
    }


def align_run(url: str, prefix: str, var_dir: Path, model: Path, env_extra: dict[str, str], timeout: float) -> dict:
    """One `secondstage align run --json` in its own process: its report, wall time and peak RSS."""
    env = {
        **os.environ,
        "SECONDSTAGE_REDIS_URL": url,
        "SECONDSTAGE_REDIS_PREFIX": prefix,
        "SECONDSTAGE_VAR_DIR": str(var_dir),
        "SECONDSTAGE_MODEL": str(model),
        "SECONDSTAGE_MAX_ROWS_PER_USER": "1000000",
        "SECONDSTAGE_MAX_ROWS_PER_RUN": "1000000",
        **env_extra,
    }
    out = var_dir / "align.out"
    var_dir.mkdir(parents=True, exist_ok=True)
    stamped: list[str] = []  # stderr lines with seconds since start: where the run's time goes

    def read_stderr(stream: Any) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                stamped.append(f"{time.monotonic() - t0:7.1f}s {line[:200]}")

    t0 = time.monotonic()
    with out.open("wb") as fo:
        proc = subprocess.Popen([sys.executable, "-m", "core.cli", "align", "run", "--json"], cwd=ROOT, env=env,
                                stdout=fo, stderr=subprocess.PIPE)  # fmt: skip
        reader = threading.Thread(target=read_stderr, args=(proc.stderr,), daemon=True)
        reader.start()
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
        reader.join(timeout=5)
    wall = time.monotonic() - t0
    lines = [ln for ln in out.read_text().splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"outcome": "no report"}
    return {
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # kilobytes on Linux
        "exit": os.waitstatus_to_exitcode(status),
        "outcome": report.get("outcome"),
        "gate_passed": (report.get("gate") or {}).get("passed"),
        "rows": report.get("rows"),
        "duration_s": report.get("duration_s"),
        "training": report.get("training"),
        "log": [ln for ln in stamped if "it/s]" not in ln and "s/it]" not in ln][-60:],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="build at 100 and 1,000 events, one align run (100 events, 2 steps)"
    )
    p.add_argument("--sizes", default=None, help="comma-separated feedback counts (default 100,1000,10000)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per phase in the scaling runs (10)")
    p.add_argument("--passes", type=int, default=None, help="alternating passes of the dataset build (2)")
    p.add_argument("--goal-events", type=int, default=200, help="events of the default-schedule run (0: skip)")
    p.add_argument("--timeout", type=float, default=1500, help="seconds one align run may take")
    args = p.parse_args()
    sizes = [int(s) for s in (args.sizes or ("100,1000" if args.quick else "100,1000,10000")).split(",")]
    steps = args.max_steps or (2 if args.quick else 10)
    run_sizes = [min(sizes)] if args.quick else sizes
    passes = args.passes or (1 if args.quick else 2)
    goal = 0 if args.quick else args.goal_events
    if min(sizes) < 4 or steps < 1 or passes < 1:
        p.error("--sizes ≥ 4 (align's min_feedback), --max-steps ≥ 1 and --passes ≥ 1 are required")
    model = ensure_demo_model()

    work = short_tmpdir("ssbench-align-")
    results: dict[str, Any] = {"quick": args.quick, "max_steps": steps, "sizes": sizes, "build": {}, "runs": {}}
    try:
        with PrivateRedis(work / "redis") as server:
            client = redis.Redis.from_url(server.url)
            for n in sorted({*sizes, *([goal] if goal else [])}):
                tags = ["build"] if n in sizes else []
                tags += ["run"] if n in run_sizes else []
                tags += ["goal"] if n == goal else []
                for tag in tags:
                    write_feedback(client, Keys(f"{tag}{n}"), n)
            console.print(f"wrote feedback for sizes {sizes} (+ {goal} for the default-schedule run)")

            builds: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
            for k in range(passes):
                for n in sizes:
                    builds[n].append(dataset_build(client, Keys(f"build{n}"), n))
                console.print(f"dataset build pass {k + 1}/{passes} done")
            for n in sizes:
                runs = builds[n]
                results["build"][str(n)] = {
                    "events": n,
                    "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
                    "seconds_passes": [round(r["seconds"], 3) for r in runs],
                    "ms_per_event": round(1e3 * statistics.median(r["seconds"] for r in runs) / n, 3),
                    "peak_mib": round(max(r["peak_mib"] for r in runs), 2),
                    "kib_per_event": round(1024 * max(r["peak_mib"] for r in runs) / n, 2),
                    "dpo_rows": runs[0]["dpo_rows"],
                    "kto_rows": runs[0]["kto_rows"],
                }

            for n in run_sizes:
                console.print(f"align run on {n} events (max_steps {steps}) ...")
                r = align_run(
                    server.url, f"run{n}", work / f"var-run{n}", model, {"SECONDSTAGE_MAX_STEPS": str(steps)},
                    args.timeout,
                )  # fmt: skip
                results["runs"][str(n)] = {"events": n, "max_steps": steps, **r}
                console.print(f"  {r['outcome']} in {r['wall_s']}s, peak RSS {r['peak_rss_mib']} MiB")
            if goal:
                console.print(f"align run on {goal} events, default training schedule ...")
                r = align_run(server.url, f"goal{goal}", work / f"var-goal{goal}", model, {}, args.timeout)
                results["goal_run"] = {"events": goal, **r}
                console.print(f"  {r['outcome']} in {r['wall_s']}s, peak RSS {r['peak_rss_mib']} MiB")
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    small, large = str(min(sizes)), str(max(sizes))
    b = results["build"]
    results["linearity"] = {
        "events_ratio": max(sizes) / min(sizes),
        "build_time_ratio": round(b[large]["seconds"] / b[small]["seconds"], 1) if b[small]["seconds"] else None,
        "build_peak_ratio": round(b[large]["peak_mib"] / b[small]["peak_mib"], 1) if b[small]["peak_mib"] else None,
    }
    t = Table(title=f"Dataset build from Redis (median of {passes} alternating passes)")
    for col in ("events", "DPO", "KTO", "seconds", "ms/event", "peak MiB", "KiB/event"):
        t.add_column(col, justify="right")
    for n in sizes:
        e = b[str(n)]
        t.add_row(*(str(x) for x in (n, e["dpo_rows"], e["kto_rows"], e["seconds"], e["ms_per_event"],
                                     e["peak_mib"], e["kib_per_event"])))  # fmt: skip
    console.print(t)
    t = Table(title=f"`secondstage align run` (max_steps {steps} per phase; the goal run: default schedule)")
    for col in ("events", "outcome", "gate", "wall s", "peak RSS MiB"):
        t.add_column(col, justify="right")
    rows = [(str(n), results["runs"][str(n)]) for n in run_sizes]
    if "goal_run" in results:
        rows.append((f"{goal} (default)", results["goal_run"]))
    for label, r in rows:
        t.add_row(label, str(r["outcome"]), str(r["gate_passed"]), str(r["wall_s"]), str(r["peak_rss_mib"]))
    console.print(t)
    console.print(f"x{results['linearity']['events_ratio']:.0f} events: {results['linearity']}")
    console.print(f"wrote {write_result('align_scale', results)}")
    from bench.plot import plot

    plot(["align_scale"])


if __name__ == "__main__":
    main()
