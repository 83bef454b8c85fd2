"""Serving overhead: secondstage against vLLM's own OpenAI server, same model, same engine, same load.

    .venv/bin/python -m bench.serving [--concurrency 16] [--requests 160] [--max-tokens 64] [--repeats 2]

Servers run one at a time (the machine has 2 cores), each driven by the same asyncio + httpx load
generator: `concurrency` clients, streamed then non-streamed, fixed prompt and `max_tokens` with
`ignore_eos` so every response has the same length.
  a  vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`)
  b  secondstage, SECONDSTAGE_POLICIES_ENABLED=false, SECONDSTAGE_LOGGING_ENABLED=false
  c  secondstage with the default policies (policies/) and Redis logging (a private redis-server, AOF always)
  d  LiteLLM's proxy in front of (a), when a `litellm` executable is found (--litellm, or var/litellm-venv/bin)
Every server is measured `--repeats` times (passes in alternating order, figures averaged) to damp the drift
of a shared machine. Reports requests/s, output tokens/s, TTFT and latency p50/p99, the ratios b/a, c/a (d/a),
and the TTFT p50 each adds. Writes bench/results/serving.json. The load generator shares the CPUs with the
server, the same way for every server; absolute figures drift with the machine's load, ratios within one run
hold better.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench.harness import (
    ROOT,
    ServerProcess,
    ensure_demo_model,
    free_port,
    running,
    secondstage_server,
    short_tmpdir,
    vllm_server,
)
from bench.results import fmt, percentile, write_result
from core.redis_server import PrivateRedis

console = Console(width=130)
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "in",
    "the",
    "tall",
    "green",
    "trees",
]


@dataclass
class Load:
    concurrency: int
    requests: int
    max_tokens: int
    prompt: str
    warmup: int


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class RunStats:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        ok = [s for s in self.samples if s.ok]
        ttfts = [s.ttft for s in ok if s.ttft is not None]
        lats = [s.latency for s in ok]
        return {
            "requests": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "first_error": next((s.error for s in self.samples if not s.ok), None),
            "wall_s": self.wall_s,
            "req_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "out_tok_per_s": sum(s.completion_tokens for s in ok) / self.wall_s if self.wall_s else 0.0,
            "completion_tokens_mean": sum(s.completion_tokens for s in ok) / len(ok) if ok else 0.0,
            "prompt_tokens_mean": sum(s.prompt_tokens for s in ok) / len(ok) if ok else 0.0,
            "ttft_p50_ms": _ms(percentile(ttfts, 50)),
            "ttft_p99_ms": _ms(percentile(ttfts, 99)),
            "latency_p50_ms": _ms(percentile(lats, 50)),
            "latency_p99_ms": _ms(percentile(lats, 99)),
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _body(load: Load, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "demo",
        "messages": [{"role": "user", "content": load.prompt}],
        "max_tokens": load.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    try:
        if not body["stream"]:
            r = await client.post(url, json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return Sample(False, latency, error=f"HTTP {r.status_code}: {r.text[:200]}")
            usage = r.json().get("usage") or {}
            return Sample(True, latency, None, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))
        ttft, chunks, usage = None, 0, {}
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Sample(False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {text[:200]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, time.perf_counter() - t0, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        if ttft is None:
                            ttft = time.perf_counter() - t0
        latency = time.perf_counter() - t0
        return Sample(True, latency, ttft, usage.get("completion_tokens", chunks), usage.get("prompt_tokens", 0))
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return Sample(False, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")


async def drive(base_url: str, load: Load, stream: bool, headers: dict[str, str] | None = None) -> RunStats:
    """`load.concurrency` clients send `load.requests` requests in all (after `load.warmup` unmeasured ones)."""
    url = base_url + "/v1/chat/completions"
    body = _body(load, stream)
    limits = httpx.Limits(max_connections=load.concurrency + 4, max_keepalive_connections=load.concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits, headers=headers) as client:
        warm = await asyncio.gather(*[_one(client, url, body) for _ in range(load.warmup)])
        if not any(s.ok for s in warm) and warm:
            raise RuntimeError(f"every warm-up request to {url} failed; first: {warm[0].error}")
        left = load.requests
        stats = RunStats()

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                stats.samples.append(await _one(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(load.concurrency)])
        stats.wall_s = time.perf_counter() - t0
    return stats


def measure(server: ServerProcess, load: Load) -> dict[str, Any]:
    out = {}
    for mode, stream in (("stream", True), ("json", False)):
        stats = asyncio.run(drive(server.url, load, stream, server.headers))
        out[mode] = stats.summary()
        s = out[mode]
        # The machine is shared: the 1-minute load average after each run says how much else was running.
        s["loadavg_1m_after"] = os.getloadavg()[0]
        console.print(
            f"  {server.name:<24} {mode:<6} {s['req_per_s']:6.2f} req/s {s['out_tok_per_s']:8.1f} tok/s "
            f"ttft p50 {fmt(s['ttft_p50_ms'])} ms  latency p50 {fmt(s['latency_p50_ms'])} ms  errors {s['errors']}  "
            f"load avg {s['loadavg_1m_after']:.1f}"
        )
    return out


def _litellm_bin(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    local = ROOT / "var" / "litellm-venv" / "bin" / "litellm"
    if local.is_file():
        return str(local)
    return shutil.which("litellm")


def litellm_server(binary: str, upstream: str, workdir: Path) -> ServerProcess:
    port = free_port()
    config = workdir / "litellm.yaml"
    # hosted_vllm: LiteLLM's provider for vLLM's OpenAI server; it passes vLLM's extra params (ignore_eos) on.
    config.write_text(
        "model_list:\n"
        "  - model_name: demo\n"
        "    litellm_params:\n"
        "      model: hosted_vllm/demo\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: unused\n"
        "litellm_settings:\n"
        "  drop_params: false\n"
    )
    key = f"sk-bench-{uuid.uuid4().hex}"  # the proxy refuses to start without a master key
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_MASTER_KEY": key}
    argv = [binary, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    return ServerProcess(
        "litellm-proxy", argv, env, port, workdir / "litellm.log", health_path="/health/liveliness", api_key=key
    )


def ratios(results: dict[str, dict[str, Any]], ref: str = "a") -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = results.get(ref)
    if not base:
        return out
    for name, res in results.items():
        if name == ref or "error" in res:
            continue
        r: dict[str, Any] = {}
        for mode in ("stream", "json"):
            a, x = base[mode], res[mode]
            r[mode] = {
                "req_per_s": x["req_per_s"] / a["req_per_s"] if a["req_per_s"] else None,
                "out_tok_per_s": x["out_tok_per_s"] / a["out_tok_per_s"] if a["out_tok_per_s"] else None,
                "added_ttft_p50_ms": (
                    x["ttft_p50_ms"] - a["ttft_p50_ms"]
                    if x["ttft_p50_ms"] is not None and a["ttft_p50_ms"] is not None
                    else None
                ),
                "added_latency_p50_ms": x["latency_p50_ms"] - a["latency_p50_ms"],
            }
        out[f"{name}/{ref}"] = r
    return out


def print_tables(results: dict[str, dict[str, Any]], rel: dict[str, Any], labels: dict[str, str]) -> None:
    t = Table(title="Serving: same model, engine and load")
    for col in ("server", "mode", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "lat p50 ms", "lat p99 ms"):
        t.add_column(col, justify="left" if col in ("server", "mode") else "right")
    t.add_column("errors", justify="right")
    for name, res in results.items():
        if "error" in res:
            t.add_row(f"{name} {labels[name]}", "-", "-", "-", "-", "-", "-", "-", res["error"][:40])
            continue
        for mode in ("stream", "json"):
            s = res[mode]
            t.add_row(
                f"{name} {labels[name]}",
                mode,
                fmt(s["req_per_s"], 2),
                fmt(s["out_tok_per_s"]),
                fmt(s["ttft_p50_ms"]),
                fmt(s["ttft_p99_ms"]),
                fmt(s["latency_p50_ms"]),
                fmt(s["latency_p99_ms"]),
                f"{s['errors']:g}",
            )
    console.print(t)
    r = Table(title="Ratios against a (vLLM's own server)")
    for col in ("ratio", "mode", "req/s", "out tok/s", "added TTFT p50 ms", "added latency p50 ms"):
        r.add_column(col, justify="left" if col in ("ratio", "mode") else "right")
    for name, modes in rel.items():
        for mode, v in modes.items():
            r.add_row(
                name,
                mode,
                fmt(v["req_per_s"], 3),
                fmt(v["out_tok_per_s"], 3),
                fmt(v["added_ttft_p50_ms"]),
                fmt(v["added_latency_p50_ms"]),
            )
    console.print(r)


def run_one(
    name: str,
    rep: int,
    load: Load,
    work: Path,
    redis: PrivateRedis,
    labels: dict[str, str],
    notes: list[str],
    started: dict[str, float],
    litellm: str | None,
) -> dict[str, Any] | None:
    """Start server `name`, measure it, stop it. None when it is skipped."""
    if name == "a":
        server = vllm_server(log=work / f"vllm-{rep}.log")
    elif name in "bc":
        flags = "false" if name == "b" else "true"
        server = secondstage_server(
            redis_url=redis.url,
            var_dir=work / f"var-{name}",
            log=work / f"secondstage-{name}-{rep}.log",
            extra_env={"SECONDSTAGE_POLICIES_ENABLED": flags, "SECONDSTAGE_LOGGING_ENABLED": flags},
        )
    else:  # d
        binary = _litellm_bin(litellm)
        if binary is None:
            note = (
                "d skipped: no `litellm` executable (pip install 'litellm[proxy]' into var/litellm-venv or --litellm)"
            )
            if note not in notes:
                notes.append(note)
            return None
        try:
            with running(vllm_server(log=work / f"vllm-d-{rep}.log")) as upstream:
                proxy = litellm_server(binary, upstream.url, work)
                started[f"d{rep}"] = proxy.start(timeout=180)
                try:
                    console.print(f"[bold]d[/] {labels['d']} pass {rep + 1} (ready in {started[f'd{rep}']:.0f}s)")
                    return measure(proxy, load)
                finally:
                    proxy.stop()
        except RuntimeError as exc:
            notes.append(f"d failed: {str(exc)[:300]}")
            return {"error": str(exc).splitlines()[0]}
    started[f"{name}{rep}"] = server.start()
    try:
        console.print(f"[bold]{name}[/] {labels[name]} pass {rep + 1} (ready in {started[f'{name}{rep}']:.0f}s)")
        return measure(server, load)
    finally:
        server.stop()


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over the passes of each figure (rates and percentiles alike); the passes are kept too."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out: dict[str, Any] = {"passes": runs}
    for mode in ("stream", "json"):
        merged: dict[str, Any] = {}
        for key, value in ok[0][mode].items():
            values = [r[mode][key] for r in ok]
            if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
                merged[key] = sum(values) / len(values)
            else:
                merged[key] = value
        out[mode] = merged
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=160, help="measured requests per server and mode")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--prompt-words", type=int, default=24, help="words in the user prompt")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests before each run")
    p.add_argument("--only", default="abcd", help="which servers to run, e.g. 'ac'")
    p.add_argument("--repeats", type=int, default=2, help="passes over the servers (alternating order), averaged")
    p.add_argument("--litellm", default=None, help="path of a `litellm` executable for (d)")
    args = p.parse_args()
    if set(args.only) - set("abcd"):
        p.error(f"--only={args.only!r}: use letters from 'abcd'")
    for name in ("concurrency", "requests", "max_tokens", "prompt_words", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")

    ensure_demo_model()
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(args.prompt_words))
    load = Load(args.concurrency, args.requests, args.max_tokens, prompt, args.warmup)
    work = short_tmpdir("ssbench-serving-")
    labels = {
        "a": "vLLM server",
        "b": "secondstage bare",
        "c": "secondstage full",
        "d": "LiteLLM → vLLM",
    }
    notes: list[str] = []
    started: dict[str, float] = {}
    console.print(f"load: {args.concurrency} clients, {args.requests} requests/mode, {args.max_tokens} tokens out")
    runs: dict[str, list[dict[str, Any]]] = {}
    redis = PrivateRedis(work / "redis")
    redis.start()
    try:
        for rep in range(args.repeats):
            # Every other pass in reverse order, so a drift in the machine's load hits each server alike.
            order = args.only if rep % 2 == 0 else args.only[::-1]
            for name in order:
                res = run_one(name, rep, load, work, redis, labels, notes, started, args.litellm)
                if res is not None:
                    runs.setdefault(name, []).append(res)
    finally:
        redis.stop()
    results = {name: combine(rs) for name, rs in runs.items()}

    rel = ratios(results)
    print_tables(results, rel, labels)
    goals = {}
    if "c/a" in rel:
        c = rel["c/a"]["stream"]
        goals = {
            "c_over_a_throughput_ge_0.90": c["out_tok_per_s"] is not None and c["out_tok_per_s"] >= 0.90,
            "c_added_ttft_p50_le_5ms": c["added_ttft_p50_ms"] is not None and c["added_ttft_p50_ms"] <= 5.0,
        }
        console.print(f"goals (streamed): {goals}")
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    path = write_result(
        "serving",
        {
            "load": {
                "concurrency": args.concurrency,
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "prompt_words": args.prompt_words,
                "warmup": args.warmup,
                "repeats": args.repeats,
            },
            "labels": labels,
            "startup_s": started,
            "results": results,
            "ratios": rel,
            "goals": goals,
            "notes": notes,
        },
    )
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
