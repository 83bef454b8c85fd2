"""Hot-swap: time from a version's activation to the first response it serves, and what streams see meanwhile.

    .venv/bin/python -m bench.swap [--versions 3] [--idle-swaps 6] [--clients 64] [--swaps 10] [--interval 2]

Starts secondstage (default policies and logging, pub/sub + reconciliation every 5 s, as shipped) on the demo
model, and publishes LoRA versions made on the spot with peft (random A and non-zero random B, so each version
really changes the output), written with VersionStore and registered/activated with Registry exactly as
align does.
1. idle: activate() a version, then ask (max_tokens=1, one request at a time) until `system_fingerprint`
   names it: swap latency without load.
2. under load: `--clients` clients stream (`--max-tokens` tokens each, ignore_eos) in a loop while a version is
   activated every `--interval` s, `--swaps` times, cycling through the versions and base; a prober measures
   the swap latency as in 1. Every stream is checked: failed (HTTP error, error chunk, no [DONE]), mixed (its
   chunks name more than one version), or mismatched (its version was not active at any moment from
   `--grace` s before it started to its end — the grace covers the swap latency itself).
Two latencies per swap: client-side, activate() → the first probe response naming the new version (includes
the probe's own queueing behind the streams); server-side, activate() → the server's own log line "now
serving version ..." (JSON log, millisecond timestamps, same clock): the moment `ModelEngine.activate`
points new requests at the new version, i.e. event delivery + registry check + `add_lora` + the switch.
Writes bench/results/swap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.table import Table

from bench.harness import DEMO, ensure_demo_model, running, secondstage_server, short_tmpdir
from bench.results import fmt, percentile, write_result
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.versions import BASE, Manifest, Registry, VersionStore

console = Console(width=170)
PROMPT = [{"role": "user", "content": "What colour is the sky?"}]


def make_adapters(n: int, out: Path, rank: int = 8) -> list[Path]:
    """`n` LoRA adapters on the demo model with random, non-zero A and B (peft's init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align.train import LORA_TARGETS

    paths = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"
        )
        peft_model = get_peft_model(model, config)
        path = out / f"adapter-{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return paths


def publish(store: VersionStore, registry: Registry, adapters: list[Path]) -> list[str]:
    names = []
    for adapter in adapters:
        manifest = Manifest(version=store.next_name(), base_model=str(DEMO), lora_rank=8)
        store.write(manifest, adapter)
        registry.register(manifest)
        name = manifest.version
        names.append(name)
    return names


async def _fingerprint(client: httpx.AsyncClient, url: str) -> str | None:
    body = {"model": "demo", "messages": PROMPT, "max_tokens": 1, "temperature": 0}
    try:
        r = await client.post(url + "/v1/chat/completions", json=body)
    except httpx.HTTPError:
        return None
    return r.json().get("system_fingerprint") if r.status_code == 200 else None


async def idle_swaps(
    url: str, registry: Registry, order: list[str], activations: list[tuple[float, str]], timeout: float = 30.0
) -> list[float]:
    latencies = []
    async with httpx.AsyncClient(timeout=60) as client:
        for version in order:
            t0 = time.perf_counter()
            activations.append((time.time(), version))
            await asyncio.to_thread(registry.activate, version)
            while await _fingerprint(client, url) != version:
                if time.perf_counter() - t0 > timeout:
                    raise RuntimeError(f"version {version} not served within {timeout}s of activation")
            latencies.append(time.perf_counter() - t0)
    return latencies


NOW_SERVING = re.compile(r"now serving version (\S+) \(was \S+; loaded in ([0-9.]+)s\)")


def server_switches(log: Path) -> list[tuple[float, str, float]]:
    """(epoch time, version, load seconds) of every "now serving" line in the server's JSON log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        m = NOW_SERVING.match(str(entry.get("message", "")))
        if m and entry.get("logger") == "secondstage.engine":
            when = dt.datetime.fromisoformat(entry["time"]).timestamp()
            out.append((when, m.group(1), float(m.group(2))))
    return out


def match_switches(
    activations: list[tuple[float, str]], switches: list[tuple[float, str, float]]
) -> list[dict[str, Any]]:
    """For each activation (epoch time, version): the first switch to that version after it, server-side."""
    out: list[dict[str, Any]] = []
    for i, (t, version) in enumerate(activations):
        until = activations[i + 1][0] if i + 1 < len(activations) else float("inf")
        # The log's timestamps have millisecond resolution: allow for the rounding.
        hit = next((sw for sw in switches if sw[1] == version and t - 0.001 <= sw[0] < until), None)
        out.append(
            {
                "version": version,
                "switch_s": None if hit is None else max(hit[0] - t, 0.0),
                "load_s": None if hit is None else hit[2],
            }
        )
    return out


@dataclass
class Stream:
    start: float
    end: float = 0.0
    fingerprints: list[str] = field(default_factory=list)
    error: str | None = None


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> Stream:
    body = {
        "model": "demo",
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    s = Stream(start=time.perf_counter())
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            s.error = f"error chunk: {str(chunk['error'])[:200]}"
                        elif chunk.get("system_fingerprint"):
                            s.fingerprints.append(chunk["system_fingerprint"])
        if s.error is None and not done:
            s.error = "stream ended without [DONE]"
        if s.error is None and not s.fingerprints:
            s.error = "no chunks"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
    s.end = time.perf_counter()
    return s


async def swaps_under_load(
    url: str,
    registry: Registry,
    order: list[str],
    activations: list[tuple[float, str]],
    *,
    clients: int,
    interval: float,
    max_tokens: int,
) -> tuple[list[Stream], list[tuple[float, str]], list[float | None], list[float]]:
    timeline: list[tuple[float, str]] = [(0.0, await asyncio.to_thread(registry.active))]
    streams: list[Stream] = []
    stop = asyncio.Event()
    latencies: list[float | None] = []
    switched: list[float] = []  # activation → sending the first probe that got the new version
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def streamer() -> None:
            while not stop.is_set():
                streams.append(await _stream(client, url, max_tokens))

        async def swapper() -> None:
            await asyncio.sleep(interval)
            for version in order:
                t0 = time.perf_counter()
                activations.append((time.time(), version))
                await asyncio.to_thread(registry.activate, version)
                timeline.append((t0, version))
                seen: float | None = None
                while time.perf_counter() - t0 < interval:
                    if seen is None:
                        sent = time.perf_counter() - t0
                        if await _fingerprint(client, url) == version:
                            seen = time.perf_counter() - t0
                            switched.append(sent)
                    else:
                        await asyncio.sleep(0.05)
                latencies.append(seen)  # None: not served within the interval
            await asyncio.sleep(interval / 2)
            stop.set()

        await asyncio.gather(swapper(), *[streamer() for _ in range(clients)])
    return streams, timeline, latencies, switched


def check(streams: list[Stream], timeline: list[tuple[float, str]], grace: float) -> dict[str, Any]:
    times = [t for t, _ in timeline]

    def active_during(a: float, b: float) -> set[str]:
        i = max(bisect.bisect_right(times, a) - 1, 0)
        j = bisect.bisect_right(times, b)
        return {v for _, v in timeline[i:j]} | {timeline[i][1]}

    failed = [s for s in streams if s.error]
    mixed = [s for s in streams if len(set(s.fingerprints)) > 1]
    mismatched = [
        s for s in streams if s.fingerprints and s.fingerprints[0] not in active_during(s.start - grace, s.end)
    ]
    served: dict[str, int] = {}
    for s in streams:
        if s.fingerprints:
            served[s.fingerprints[0]] = served.get(s.fingerprints[0], 0) + 1
    return {
        "streams": len(streams),
        "failed": len(failed),
        "mixed": len(mixed),
        "mismatched": len(mismatched),
        "first_errors": [s.error for s in failed[:3]],
        "streams_per_version": served,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=3, help="LoRA versions to publish")
    p.add_argument("--idle-swaps", type=int, default=6, help="swaps timed without load")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients during swaps")
    p.add_argument("--swaps", type=int, default=10, help="swaps under load")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between swaps under load")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (ignore_eos)")
    p.add_argument("--grace", type=float, default=2.0, help="seconds a superseded version may still start streams")
    args = p.parse_args()
    for name in ("versions", "clients", "swaps", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")

    ensure_demo_model()
    work = short_tmpdir("ssbench-swap-")
    try:
        console.print(f"making {args.versions} LoRA adapters with peft ...")
        adapters = make_adapters(args.versions, work / "adapters")
        cycle = [*[f"v{i + 1}" for i in range(args.versions)], BASE]
        with PrivateRedis(work / "redis") as rs:
            # Log level info, JSON: the engine's "now serving" lines time the switch on the server's side.
            server = secondstage_server(
                redis_url=rs.url,
                var_dir=work / "var",
                log=work / "server.log",
                log_level="info",
                extra_env={"SECONDSTAGE_LOG_FORMAT": "json"},
            )
            client = redis.Redis.from_url(rs.url)
            registry = Registry(client, Keys())
            names = publish(VersionStore(work / "var" / "models" / "versions"), registry, adapters)
            assert names == cycle[:-1], names
            with running(server):
                console.print(f"server up at {server.url}; idle swaps ...")
                idle_order = [cycle[i % len(cycle)] for i in range(args.idle_swaps)]
                idle_acts: list[tuple[float, str]] = []
                idle = asyncio.run(idle_swaps(server.url, registry, idle_order, idle_acts))
                console.print(f"under load: {args.clients} streaming clients, {args.swaps} swaps ...")
                # Continue the cycle where the idle swaps left it: every activation is a real switch.
                load_order = [cycle[(args.idle_swaps + i) % len(cycle)] for i in range(args.swaps)]
                load_acts: list[tuple[float, str]] = []
                streams, timeline, loaded, switched = asyncio.run(
                    swaps_under_load(
                        server.url,
                        registry,
                        load_order,
                        load_acts,
                        clients=args.clients,
                        interval=args.interval,
                        max_tokens=args.max_tokens,
                    )
                )
                log_tail = server.tail(20)
                switches = server_switches(server.log)
            client.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = check(streams, timeline, args.grace)
    seen = [x for x in loaded if x is not None]
    idle_server = match_switches(idle_acts, switches)
    load_server = match_switches(load_acts, switches)
    idle_sw = [s["switch_s"] for s in idle_server if s["switch_s"] is not None]
    load_sw = [s["switch_s"] for s in load_server if s["switch_s"] is not None]
    out = {
        "params": vars(args),
        "idle_swap_s": idle,
        "idle_swap_p50_s": percentile(idle, 50),
        "idle_swap_max_s": max(idle),
        "loaded_swap_s": loaded,
        "loaded_swap_p50_s": percentile(seen, 50),
        "loaded_swap_max_s": max(seen) if seen else None,
        "loaded_swaps_not_seen": len(loaded) - len(seen),
        # The probe's own time in the queue behind the streams is part of the loaded latency; the send time of
        # the probe that first got the new version bounds when the server had switched.
        "loaded_switched_by_p50_s": percentile(switched, 50),
        "loaded_switched_by_max_s": max(switched) if switched else None,
        # Server-side: activate() → the engine's "now serving" log line (new requests get the new version).
        "idle_server_switch": idle_server,
        "idle_server_switch_p50_s": percentile(idle_sw, 50),
        "idle_server_switch_max_s": max(idle_sw) if idle_sw else None,
        "loaded_server_switch": load_server,
        "loaded_server_switch_p50_s": percentile(load_sw, 50),
        "loaded_server_switch_max_s": max(load_sw) if load_sw else None,
        "loaded_server_switches_missing": len(load_server) - len(load_sw),
        "streams": result,
        "server_log_tail": log_tail if result["failed"] else None,
    }
    out["goals"] = {
        "swap_le_1s": out["idle_swap_max_s"] <= 1.0 and (out["loaded_swap_max_s"] or 99) <= 1.0,
        "server_switch_le_1s": (out["loaded_server_switch_max_s"] or 99) <= 1.0
        and not out["loaded_server_switches_missing"],
        "zero_failures": result["failed"] == 0 and result["mixed"] == 0 and result["mismatched"] == 0,
    }
    t = Table(title="Hot-swap")
    cols = ["phase", "swaps", "server switch p50 s", "server switch max s", "first response p50 s"]
    cols += ["first response max s", "streams", "failed", "mixed", "mismatched"]
    for col in cols:
        t.add_column(col, justify="left" if col == "phase" else "right")
    idle_p50, idle_max = fmt(out["idle_swap_p50_s"], 3), fmt(out["idle_swap_max_s"], 3)
    t.add_row(
        "idle",
        str(len(idle)),
        fmt(out["idle_server_switch_p50_s"], 3),
        fmt(out["idle_server_switch_max_s"], 3),
        idle_p50,
        idle_max,
        "-",
        "-",
        "-",
        "-",
    )
    t.add_row(
        f"{args.clients} streaming clients",
        f"{len(loaded)} ({out['loaded_swaps_not_seen']} unseen)",
        fmt(out["loaded_server_switch_p50_s"], 3),
        fmt(out["loaded_server_switch_max_s"], 3),
        fmt(out["loaded_swap_p50_s"], 3),
        fmt(out["loaded_swap_max_s"], 3),
        str(result["streams"]),
        str(result["failed"]),
        str(result["mixed"]),
        str(result["mismatched"]),
    )
    console.print(t)
    console.print(
        f"under load the server had switched by {fmt(out['loaded_switched_by_p50_s'], 3)} s (p50) / "
        f"{fmt(out['loaded_switched_by_max_s'], 3)} s (max) after activate(); the rest is the probe request's "
        f"own latency behind {args.clients} streams"
    )
    console.print(f"streams per version: {result['streams_per_version']}")
    if result["first_errors"]:
        console.print(f"[red]first errors:[/] {result['first_errors']}")
    console.print(f"goals: {out['goals']}")
    console.print(f"wrote {write_result('swap', out)}")


if __name__ == "__main__":
    main()
