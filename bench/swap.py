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

`--merged-weights` runs the same on a server in merged-weights mode (SECONDSTAGE_MERGED_WEIGHTS: the incumbent
is merged into the engine's weights, a swap is pause → reload_weights → prefix-cache reset → resume), with
the versions merged ahead (`--no-premerge`: the server merges on the swap) and first a throughput phase on
the same server, `--throughput-passes` times in alternating order, after a warm-up each:
   base    the base model is the incumbent (no adapter);
   lora    v1 as a canary for (nearly) every caller beside the base: v1's adapter on every request, what
           LoRA mode costs (a canary beside `base` is the version's own adapter);
   merged  v1 promoted: its merged weights, no adapter.
Each: `--tp-clients` clients streaming `--tp-requests` requests of `--tp-tokens` tokens (ignore_eos). The
server switch then is activate() → the "now serving" line, which merged mode writes once the new weights
are loaded and new requests run on them; the log's phases (merge, drain, reload) are reported too.
Writes bench/results/swap_merged.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
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

from bench.harness import DEMO, ServerProcess, ensure_demo_model, running, secondstage_server, short_tmpdir
from bench.load import chat_body, drive_http, prompt, summarise
from bench.results import fmt, percentile, write_result
from core.canary import Rollout
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
WEIGHTS_LOADED = re.compile(r"weights of (\S+) loaded \(merge ([0-9.]+)s, drain ([0-9.]+)s, reload ([0-9.]+)s\)")


def reload_phases(log: Path) -> list[dict[str, Any]]:
    """Merged mode: (version, merge s, drain s, reload s) of every weights swap in the server's JSON log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                m = WEIGHTS_LOADED.match(str(json.loads(line).get("message", "")))
                if m:
                    out.append({"version": m.group(1), **{k: float(m.group(i + 2)) for i, k in enumerate(PHASES)}})
    return out


PHASES = ("merge_s", "drain_s", "reload_s")


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


async def _wait_served(url: str, version: str, timeout: float = 300.0) -> None:
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as client:
        while await _fingerprint(client, url) != version:
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"version {version} not served within {timeout}s")
            await asyncio.sleep(0.1)


def set_mode(server: ServerProcess, registry: Registry, mode: str, version: str) -> None:
    """Make the server serve the throughput phase's `mode` (base, lora, merged) and wait until it does."""
    rollout = Rollout(registry.client, registry.keys)
    if mode == "lora":
        if registry.active() != BASE:
            registry.activate(BASE)
            asyncio.run(_wait_served(server.url, BASE))
        for _ in range(5):  # the share is < 1 by contract: retry in the rare run whose hash leaves us out
            rollout.start(version, share=0.999, reason="bench: LoRA on every request")
            try:
                asyncio.run(_wait_served(server.url, version, timeout=60))
                return
            except RuntimeError:
                continue
        raise RuntimeError("the canary never served the benchmark's caller")
    target = BASE if mode == "base" else version
    registry.activate(target)  # ends a running canary
    asyncio.run(_wait_served(server.url, target))


def throughput(
    server: ServerProcess, registry: Registry, version: str, *, passes: int, clients: int, requests: int, tokens: int
) -> dict[str, Any]:
    """tok/s of base, LoRA (v1 as a canary for everyone) and merged v1 on one server, in alternating passes."""
    import os

    modes = ["base", "lora", "merged"]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    serial = 0
    for rep in range(passes):
        for mode in modes if rep % 2 == 0 else list(reversed(modes)):
            set_mode(server, registry, mode, version)
            bodies = [chat_body("demo", prompt(serial + i, 20), tokens, True) for i in range(requests)]
            warm = [chat_body("demo", prompt(serial + requests + i, 20), tokens, True) for i in range(clients)]
            serial += requests + clients
            samples, wall, _ = asyncio.run(drive_http(server.url, bodies, concurrency=clients, warmup=warm))
            stats = summarise(samples, wall)
            stats["load_1m"] = os.getloadavg()[0]
            runs[mode].append(stats)
            console.print(
                f"  pass {rep + 1} {mode:6s} {stats['out_tok_per_s']:7.0f} tok/s  ttft p50 "
                f"{fmt(stats['ttft_p50_ms'], 0)} ms  errors {stats['errors']}  load {stats['load_1m']:.1f}"
            )
    out: dict[str, Any] = {"params": {"passes": passes, "clients": clients, "requests": requests, "tokens": tokens}}
    for mode in modes:
        rates = [r["out_tok_per_s"] for r in runs[mode]]
        out[mode] = {"tok_per_s": rates, "tok_per_s_median": percentile(rates, 50), "runs": runs[mode]}
    for mode in ("lora", "merged"):
        ratios = [m["out_tok_per_s"] / b["out_tok_per_s"] for m, b in zip(runs[mode], runs["base"], strict=True)]
        out[f"{mode}/base"] = {"per_pass": ratios, "median": percentile(ratios, 50)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", type=int, default=3, help="LoRA versions to publish")
    p.add_argument("--idle-swaps", type=int, default=6, help="swaps timed without load")
    p.add_argument("--clients", type=int, default=64, help="concurrent streaming clients during swaps")
    p.add_argument("--swaps", type=int, default=10, help="swaps under load")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between swaps under load")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (ignore_eos)")
    p.add_argument("--grace", type=float, default=2.0, help="seconds a superseded version may still start streams")
    p.add_argument("--merged-weights", action="store_true", help="the server in merged-weights mode (see above)")
    p.add_argument("--premerge", action=argparse.BooleanOptionalAction, default=True, help="merged: merge ahead")
    p.add_argument("--throughput-passes", type=int, default=2, help="merged: passes of base/lora/merged (0: none)")
    p.add_argument("--tp-clients", type=int, default=16, help="merged: streaming clients per throughput cell")
    p.add_argument("--tp-requests", type=int, default=64, help="merged: requests per throughput cell")
    p.add_argument("--tp-tokens", type=int, default=64, help="merged: tokens per request (ignore_eos)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="SECONDSTAGE_MAX_LORA_RANK (default: 16)")
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
        merge_s: list[float] = []
        tput: dict[str, Any] | None = None
        with PrivateRedis(work / "redis") as rs:
            # Log level info, JSON: the engine's "now serving" lines time the switch on the server's side.
            env = {"SECONDSTAGE_LOG_FORMAT": "json"}
            if args.max_lora_rank is not None:
                env["SECONDSTAGE_MAX_LORA_RANK"] = str(args.max_lora_rank)
            if args.merged_weights:
                # No automatic decision while the throughput phase runs v1 as a canary.
                env |= {"SECONDSTAGE_MERGED_WEIGHTS": "true", "SECONDSTAGE_CANARY_MIN_DURATION_S": "86400"}
            server = secondstage_server(
                redis_url=rs.url, var_dir=work / "var", log=work / "server.log", log_level="info", extra_env=env
            )
            client = redis.Redis.from_url(rs.url)
            registry = Registry(client, Keys())
            store = VersionStore(work / "var" / "models" / "versions")
            names = publish(store, registry, adapters)
            assert names == cycle[:-1], names
            if args.merged_weights and args.premerge:
                from core.merge import merge_adapter, merged_path

                for name in names:
                    t0 = time.perf_counter()
                    merge_adapter(str(DEMO), store.adapter_path(name), merged_path(store, name))
                    merge_s.append(time.perf_counter() - t0)
                console.print(f"merged {len(names)} versions ahead: {', '.join(f'{s:.1f}s' for s in merge_s)}")
            with running(server):
                if args.merged_weights and args.throughput_passes:
                    console.print(f"throughput: base / lora / merged, {args.throughput_passes} passes ...")
                    tput = throughput(
                        server,
                        registry,
                        names[0],
                        passes=args.throughput_passes,
                        clients=args.tp_clients,
                        requests=args.tp_requests,
                        tokens=args.tp_tokens,
                    )
                    registry.activate(BASE)  # the swap phases start from the base, as in LoRA mode
                    asyncio.run(_wait_served(server.url, BASE))
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
                phases = reload_phases(server.log)
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
    if args.merged_weights:
        out["merge_ahead_s"] = merge_s
        out["reload_phases"] = phases
        out["reload_s_p50"] = percentile([ph["reload_s"] for ph in phases], 50)
        out["drain_s_p50"] = percentile([ph["drain_s"] for ph in phases], 50)
        out["throughput"] = tput
    out["goals"] = {
        "swap_le_1s": out["idle_swap_max_s"] <= 1.0 and (out["loaded_swap_max_s"] or 99) <= 1.0,
        "server_switch_le_1s": (out["loaded_server_switch_max_s"] or 99) <= 1.0
        and not out["loaded_server_switches_missing"],
        "zero_failures": result["failed"] == 0 and result["mixed"] == 0 and result["mismatched"] == 0,
    }
    t = Table(title="Hot-swap (merged weights)" if args.merged_weights else "Hot-swap")
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
    if args.merged_weights:
        if tput is not None:
            console.print(
                f"throughput ({args.tp_clients} streaming clients x {args.tp_tokens} tokens, median of "
                f"{args.throughput_passes} passes): base {fmt(tput['base']['tok_per_s_median'], 0)} tok/s, "
                f"lora {fmt(tput['lora']['tok_per_s_median'], 0)} (x{fmt(tput['lora/base']['median'], 2)}), "
                f"merged {fmt(tput['merged']['tok_per_s_median'], 0)} (x{fmt(tput['merged/base']['median'], 2)})"
            )
        console.print(
            f"merged swaps: reload p50 {fmt(out['reload_s_p50'], 3)} s, drain p50 {fmt(out['drain_s_p50'], 3)} s "
            f"over {len(phases)} swaps; merge ahead {', '.join(f'{x:.1f}s' for x in merge_s) or 'not done'}"
        )
    console.print(f"wrote {write_result('swap_merged' if args.merged_weights else 'swap', out)}")


if __name__ == "__main__":
    main()
