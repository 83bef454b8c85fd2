"""Serving against the limit: the raw engine, vLLM's own OpenAI server and secondstage, across a sweep of loads.

    .venv/bin/python -m bench.serving [--quick] [--passes 3] [--only rabc] [--cells c16-] [--scale 1.0] [--grid]
    .venv/bin/python -m bench.serving --report      # the last run's tables again, and as Markdown

Same model, same engine settings (`bench.harness.BENCH_ENGINE`, which are ServeSettings' defaults), same load,
same prompt tokens (full secondstage's instructions rule puts a system message in front of every request, so the
other servers' clients send that message themselves; `--bare-prompts` sends them the bare prompts instead):
  r  the raw engine: `AsyncLLM` with secondstage's engine arguments, driven in-process with no HTTP
     (bench/raw_engine.py, a fresh subprocess per pass; its docstring says why) — the ceiling
  a  vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`), with the LoRA adapter under
     `--lora-modules`
  b  secondstage bare: SECONDSTAGE_POLICIES_ENABLED=false, SECONDSTAGE_LOGGING_ENABLED=false
  c  secondstage full: the default policies (policies/) and Redis logging (a private redis-server, AOF always)
  d  LiteLLM's proxy in front of (a), only when asked (`--only rabcd`) and a `litellm` executable is found

The sweep (`sweep()`): 1, 16, 64 and 256 concurrent clients; 64 and 512 output tokens; ~50- and ~850-token
prompts; streamed and JSON; a request-rate run at max_tokens=1 (per-request overhead); and the same
16-client cells with a LoRA adapter active (r: a LoRARequest, a: `--lora-modules`, b/c: a version published
and activated exactly as align does). Not every combination runs — `make bench` must finish in 30 minutes on
two cores — `sweep()` says which are left out and why.

Each server starts fresh once per pass, is warmed up (a burst of every cell's shape, unmeasured), then runs
every cell in the same order. Passes alternate the servers' order (r a b c, then c b a r, ...) so a drift in
the machine's load hits each alike. Per cell: the median over passes of each figure and its spread; ratios
are computed per pass (x over r, x over a, same pass) and reported as median [min-max]. A ratio whose passes
fall on both sides of 1.0 is "inside the noise"; one whose every pass is on the same side is not. TTFT added
is the median over passes of the difference of TTFT p50s. Writes bench/results/serving.json; figures are
printed, never judged by the exit status.

The load generator (bench/load.py, asyncio + aiohttp) shares the CPUs with the HTTP servers; the raw engine
has no such neighbour (part of what the ceiling leaves out). Absolute figures drift with the machine's load;
every cell records the 1-minute load average after it ran.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.table import Table

from bench.harness import (
    BENCH_ENGINE,
    PYTHON,
    ROOT,
    Engine,
    ServerProcess,
    cpu_by_process,
    cpu_seconds,
    ensure_demo_model,
    free_port,
    log_tail,
    running,
    secondstage_env,
    secondstage_server,
    short_tmpdir,
    vllm_server,
)
from bench.load import LONG_WORDS, SHORT_WORDS, chat_body, drive_http, prompt, summarise
from bench.results import fmt, load_result, write_result
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.versions import BASE, Manifest, Registry, VersionStore
from serve.placement import worker_free_cpus

console = Console(width=220)
PLACED = {"SECONDSTAGE_KEEP_OFF_WORKER_CPUS": "true"}
"""secondstage and the raw engine keep their processes off the engine worker's cores (serve/placement.py: opt-in,
its setting says why), as the published figures were measured."""
LABELS = {
    "r": "raw engine",
    "a": "vLLM server",
    "b": "secondstage bare",
    "c": "secondstage full",
    "d": "LiteLLM → vLLM",
}
LORA_NAME = "bench-lora"
"""The adapter's served name on vLLM's server (`--lora-modules`)."""


@dataclass(frozen=True)
class Cell:
    concurrency: int
    max_tokens: int
    prompt: str  # "short" | "long"
    stream: bool
    requests: int
    lora: bool = False

    @property
    def name(self) -> str:
        mode = "stream" if self.stream else "json"
        return f"{'lora-' if self.lora else ''}c{self.concurrency}-o{self.max_tokens}-{self.prompt}-{mode}"

    @property
    def words(self) -> int:
        return LONG_WORDS if self.prompt == "long" else SHORT_WORDS

    @property
    def warmup(self) -> int:
        """Unmeasured requests of the cell's own shape right before it (the server-wide warm-up came first)."""
        return min(self.concurrency, 4)

    @property
    def metric(self) -> str:
        """The throughput figure ratios use: requests/s when there is one token out, tokens/s otherwise."""
        return "req_per_s" if self.max_tokens == 1 else "out_tok_per_s"


# Measured requests per cell, by (concurrency, output tokens, prompt): each client sends at least one, and a
# cell lasts seconds, not minutes, at the demo model's ~1-3k tokens/s on 2 cores.
REQUESTS = {
    (1, 64, "short"): 8,
    (16, 64, "short"): 48,
    (64, 64, "short"): 128,
    (256, 64, "short"): 256,
    (1, 512, "short"): 2,
    (16, 512, "short"): 16,
    (64, 512, "short"): 64,
    (256, 512, "short"): 256,
    (1, 64, "long"): 8,
    (16, 64, "long"): 32,
    (64, 64, "long"): 64,
    (256, 64, "long"): 256,
}
RATE_REQUESTS = 256
"""The request-rate run (64 clients, one token out)."""


def sweep(quick: bool = False, scale: float = 1.0, grid: bool = False) -> list[Cell]:
    """The cells every server runs, in order.

    Default (`make bench`): 1/16/64/256 clients × 64 tokens out × ~50-token prompts; 16 clients × 512 tokens
    out; 1/16/64 clients × ~850-token prompts; the request-rate run; LoRA at 16 clients — each streamed and
    JSON, 20 cells. Three passes over four servers of these cost ~1,400 CPU-seconds (measured: a pass of the
    four servers used 640 CPU-s with the cells below, 29% of them in 64 clients × 512 tokens), about 15
    minutes with server starts on two idle cores, which leaves `make bench` room for the other benchmarks.
    `grid=True` (`--grid`) adds what that leaves out: 512 tokens out at 1, 64 and 256 clients (the 1-client
    cell shows latency the 64-token one already shows; 64 clients × 512 tokens is 32k tokens per server and
    mode) and ~850-token prompts at 256 clients (218k prompt tokens; the engine runs 64 sequences at once, so
    256 clients only queue behind what the 64-client cell shows). ~850-token prompts with 512 tokens out never
    run: prompt + completion would exceed the 1,024-token context. `quick` keeps one small cell of each kind.
    """

    def cell(c: int, out: int, p: str, stream: bool, lora: bool = False) -> Cell:
        n = REQUESTS[(c, out, p)] if not quick else max(2, min(c, 4096 // out // 4))
        return Cell(c, out, p, stream, max(c, round(n * scale)), lora)

    if quick:
        # One cell of each kind, streamed and JSON taken in turn (each path still runs): `make bench-quick` ≤ 5 min.
        rate = Cell(64, 1, "short", False, max(64, round(64 * scale)))
        return [cell(1, 64, "short", True), cell(16, 64, "long", False), cell(16, 512, "short", True), rate,
                cell(16, 64, "short", True, lora=True)]  # fmt: skip
    shapes = [
        *[(c, 64, "short") for c in (1, 16, 64, 256)],
        *[(c, 512, "short") for c in ((1, 16, 64, 256) if grid else (16,))],
        *[(c, 64, "long") for c in (1, 16, 64, *((256,) if grid else ()))],
    ]
    cells = [cell(c, o, p, s) for c, o, p in shapes for s in (True, False)]
    # The request-rate run: one token out, so each request is almost nothing but the server's own work.
    cells += [Cell(64, 1, "short", s, max(64, round(RATE_REQUESTS * scale))) for s in (True, False)]
    return cells + [cell(16, 64, "short", s, lora=True) for s in (True, False)]


# -- running one server over the sweep -----------------------------------------------------------


class Prompts:
    """Unique prompts for a pass: every request of every server in the pass gets the same i-th text."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int, words: int) -> list[str]:
        out = [prompt(self.next + i, words) for i in range(n)]
        self.next += n
        return out


def plan(cells: list[Cell]) -> list[dict[str, Any]]:
    """Each cell with its warm-up and measured prompts, preceded by a server-wide warm-up burst."""
    prompts = Prompts()
    shapes = {(c.max_tokens, c.prompt, c.stream, c.lora) for c in cells}
    warm = [
        {
            "name": f"warmup-{out}-{p}-{'stream' if s else 'json'}{'-lora' if lora else ''}",
            "concurrency": 8,
            "max_tokens": min(out, 64),
            "stream": s,
            "lora": lora,
            "warmup": [],
            "prompts": prompts.take(8, LONG_WORDS if p == "long" else SHORT_WORDS),
            "discard": True,
        }
        for out, p, s, lora in sorted(shapes)
        if not lora  # the adapter's warm-up comes after the swap to it
    ]
    measured = [
        {
            "name": c.name,
            "concurrency": c.concurrency,
            "max_tokens": c.max_tokens,
            "stream": c.stream,
            "lora": c.lora,
            "warmup": prompts.take(c.warmup, c.words),
            "prompts": prompts.take(c.requests, c.words),
            "discard": False,
        }
        for c in cells
    ]
    return warm + measured


def run_http(
    server: ServerProcess,
    steps: list[dict[str, Any]],
    on_lora: Any,
    extra_pids: tuple[int, ...] = (),
    system: str | None = None,
) -> dict[str, Any]:
    """Every step against `server`; `on_lora()` returns the model name LoRA steps ask for (after switching).
    The CPU of the server's process tree (and of `extra_pids`: Redis for secondstage) is counted per cell.
    `system`: a system message every request sends first (the equal prompts, `instructions_message`)."""
    assert server.proc is not None
    pid = server.proc.pid

    def server_cpu() -> dict[str, float]:
        roles = cpu_by_process(pid)
        if extra_pids:
            roles["redis"] = sum(cpu_seconds(p) for p in extra_pids)
        return roles

    # The load generator (this thread) and the Redis secondstage logs to keep off the cores the server's engine
    # workers are bound to, as secondstage keeps its own processes (serve/placement.py) and as clients on other
    # machines would: run on a worker's core they preempt forward passes, whichever server is measured.
    cpus = worker_free_cpus(pid)
    before = {p: os.sched_getaffinity(p) for p in (0, *extra_pids)}
    if cpus is not None:
        for p in before:
            os.sched_setaffinity(p, cpus)
    try:
        return _steps(server, steps, on_lora, server_cpu, system)
    finally:
        for p, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(p, mask)  # servers this process starts next inherit its mask


def _steps(
    server: ServerProcess,
    steps: list[dict[str, Any]],
    on_lora: Any,
    server_cpu: Any,
    system: str | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lora_model: str | None = None
    for step in steps:
        model = "demo"
        if step["lora"]:
            if lora_model is None:
                lora_model = on_lora()
            model = lora_model
        bodies = [chat_body(model, p, step["max_tokens"], step["stream"], system) for p in step["prompts"]]
        warm = [chat_body(model, p, step["max_tokens"], step["stream"], system) for p in step["warmup"]]
        samples, wall, cores = asyncio.run(
            drive_http(
                server.url,
                bodies,
                concurrency=step["concurrency"],
                warmup=warm,
                headers=server.headers,
                server_cpu=server_cpu,
            )
        )
        if step["discard"]:
            continue
        s = summarise(samples, wall) | cores
        s["loadavg_1m_after"] = os.getloadavg()[0]
        out[step["name"]] = s
        _progress(server.name, step["name"], s)
    return out


def run_raw(
    env: dict[str, str], steps: list[dict[str, Any]], adapter: Path, work: Path, rep: int, system: str | None = None
) -> dict[str, Any]:
    spec = work / f"raw-spec-{rep}.json"
    result = work / f"raw-out-{rep}.json"
    log = work / f"raw-{rep}.log"
    cells = [{**s, "adapter": str(adapter) if s["lora"] else None} for s in steps]
    spec.write_text(json.dumps({"cells": cells, "system": system}))
    t0 = time.monotonic()
    with log.open("wb") as out:
        rc = subprocess.run(
            [PYTHON, "-m", "bench.raw_engine", str(spec), str(result)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            timeout=3600,
        ).returncode
    if rc != 0:
        raise RuntimeError(f"raw engine exited with {rc}; log {log}:\n{log_tail(log)}")
    raw = json.loads(result.read_text())
    console.print(f"  raw engine: ready in {raw['startup_s']:.0f}s, whole pass {time.monotonic() - t0:.0f}s")
    kept = {}
    for step in steps:
        if not step["discard"]:
            kept[step["name"]] = raw["cells"][step["name"]]
            _progress("raw", step["name"], kept[step["name"]])
    return kept


def _progress(server: str, cell: str, s: dict[str, Any]) -> None:
    console.print(
        f"  {server:<12} {cell:<28} {s['req_per_s']:7.2f} req/s {s['out_tok_per_s']:8.1f} tok/s "
        f"ttft p50 {fmt(s['ttft_p50_ms']):>7} ms  lat p50 {fmt(s['latency_p50_ms']):>8} ms  "
        f"errors {s['errors']}  cores srv {s['server_cores']:.2f} cli {s['client_cores']:.2f}  "
        f"load {s['loadavg_1m_after']:.1f}"
    )


def publish_adapter(adapter: Path, var_dir: Path, registry: Registry) -> str:
    """Write the adapter into `var_dir`'s version store and register it, as align does; returns its name."""
    store = VersionStore(var_dir / "models" / "versions")
    manifest = Manifest(version="v1", base_model="demo", lora_rank=8)
    if "v1" not in store.names():
        store.write(manifest, adapter)
    registry.register(manifest)
    return manifest.version


def switch_to(server: ServerProcess, registry: Registry, version: str, timeout: float = 120.0) -> float:
    """Activate `version` and wait until the server answers with it; returns the seconds it took."""
    t0 = time.monotonic()
    registry.activate(version)
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    while time.monotonic() - t0 < timeout:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers, timeout=60)
        if r.status_code == 200 and r.json().get("system_fingerprint") == version:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not serve {version} within {timeout}s of its activation")


def instructions_message(policies: Path) -> str | None:
    """The system message full secondstage's instructions rules add to every request (None if they add none).

    The other servers' clients send it themselves, so every server prefills the same tokens: without it full
    secondstage's prompts were 3× the others' (138 against 45 tokens on the short prompts), and its ratios
    measured that prefill as much as the server.
    """
    from core.policy.engine import PolicyEngine
    from core.policy.scope import RequestContext

    engine = PolicyEngine(policies)
    engine.load()
    messages = engine.check_input([{"role": "user", "content": "x"}], RequestContext(None, None, "demo")).messages
    return messages[0]["content"] if len(messages) > 1 and messages[0]["role"] == "system" else None


def run_one(
    name: str, rep: int, steps: list[dict[str, Any]], work: Path, rs: PrivateRedis, adapter: Path, args: Any
) -> dict[str, Any]:
    t0 = time.monotonic()
    console.print(f"[bold]{name}[/] {LABELS[name]} pass {rep + 1}")
    # Every server but full secondstage (whose instructions rule adds it) gets the instructions from its client.
    system = None if name == "c" else args.system
    if name == "r":
        env = secondstage_env(
            redis_url=rs.url, var_dir=work / "var-r", port=free_port(), engine=args.engine, extra_env=PLACED
        )
        return run_raw(env, steps, adapter, work, rep, system)
    if name == "a":
        vllm = vllm_server(log=work / f"vllm-{rep}.log", lora_modules={LORA_NAME: adapter}, engine=args.engine)
        with running(vllm) as server:
            console.print(f"  ready in {time.monotonic() - t0:.0f}s")
            return run_http(server, steps, lambda: LORA_NAME, system=system)
    if name == "d":
        return _litellm(rep, steps, work, args.litellm, system, args.engine)
    flag = "false" if name == "b" else "true"
    var_dir = work / f"var-{name}"
    client = redis.Redis.from_url(rs.url)
    registry = Registry(client, Keys())
    version = publish_adapter(adapter, var_dir, registry)
    registry.activate(BASE)
    server = secondstage_server(
        engine=args.engine,
        redis_url=rs.url,
        var_dir=var_dir,
        log=work / f"secondstage-{name}-{rep}.log",
        extra_env={"SECONDSTAGE_POLICIES_ENABLED": flag, "SECONDSTAGE_LOGGING_ENABLED": flag, **PLACED},
    )
    try:
        with running(server):
            console.print(f"  ready in {time.monotonic() - t0:.0f}s")

            def on_lora() -> str:
                took = switch_to(server, registry, version)
                console.print(f"  activated {version}: served {took:.2f}s after activate()")
                return "demo"

            # Redis' CPU counts as the server's: logging (c) writes every completion there.
            return run_http(server, steps, on_lora, extra_pids=(rs.pid,) if rs.pid else (), system=system)
    finally:
        registry.activate(BASE)  # the next server starts on the base model
        client.close()


def _litellm(
    rep: int,
    steps: list[dict[str, Any]],
    work: Path,
    explicit: str | None,
    system: str | None = None,
    engine: Engine = BENCH_ENGINE,
) -> dict[str, Any]:
    binary = explicit or _litellm_bin()
    if binary is None:
        raise RuntimeError("no `litellm` executable (pip install 'litellm[proxy]' into var/litellm-venv, or --litellm)")
    adapter_free = [s for s in steps if not s["lora"]]
    with (
        running(vllm_server(log=work / f"vllm-d-{rep}.log", engine=engine)) as upstream,
        running(litellm_server(binary, upstream.url, work), timeout=180) as proxy,
    ):
        return run_http(proxy, adapter_free, lambda: "demo", system=system)


def _litellm_bin() -> str | None:
    local = ROOT / "var" / "litellm-venv" / "bin" / "litellm"
    return str(local) if local.is_file() else shutil.which("litellm")


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


# -- figures over the passes -----------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def combine(passes: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over passes of each numeric figure, plus the relative spread (max-min)/median of the rates."""
    out: dict[str, Any] = {}
    for key, value in passes[0].items():
        values = [p[key] for p in passes if isinstance(p.get(key), (int, float))]
        out[key] = _median(values) if isinstance(value, (int, float)) or values else value
    for key in ("out_tok_per_s", "req_per_s"):
        values = [p[key] for p in passes]
        med = statistics.median(values)
        out[f"{key}_spread"] = (max(values) - min(values)) / med if med else None
        out[f"{key}_passes"] = values
    out["errors"] = sum(p["errors"] for p in passes)
    return out


Runs = dict[str, list[dict[str, Any] | None]]


def ratio(cell: Cell, runs: Runs, x: str, ref: str, ref_cell: str | None = None) -> dict[str, Any] | None:
    """x over ref in `cell`, pass by pass (same pass: measured minutes apart), as median [min, max] + verdict."""
    xs, refs = runs.get(x), runs.get(ref)
    if not xs or not refs:
        return None
    key, other = cell.name, ref_cell or cell.name
    per_pass = [
        xp[key][cell.metric] / rp[other][cell.metric]
        for xp, rp in zip(xs, refs, strict=True)
        if xp and rp and key in xp and other in rp and rp[other][cell.metric]
    ]
    if not per_pass:
        return None
    ttft = [
        xp[key]["ttft_p50_ms"] - rp[other]["ttft_p50_ms"]
        for xp, rp in zip(xs, refs, strict=True)
        if xp
        and rp
        and key in xp
        and other in rp
        and xp[key]["ttft_p50_ms"] is not None
        and rp[other]["ttft_p50_ms"] is not None
    ]
    lo, hi = min(per_pass), max(per_pass)
    if len(per_pass) < 2:
        verdict = "one pass: no noise estimate"
    elif lo <= 1.0 <= hi:
        verdict = "inside the noise"
    else:
        verdict = "faster" if lo > 1.0 else "slower"
    return {
        "median": statistics.median(per_pass),
        "min": lo,
        "max": hi,
        "passes": per_pass,
        "verdict": verdict,
        "added_ttft_p50_ms": _median(ttft),
        "added_ttft_p50_ms_passes": ttft,
    }


COMPARISONS = [("c", "r"), ("c", "a"), ("b", "r"), ("b", "a"), ("a", "r"), ("d", "a")]


def analyse(cells: list[Cell], runs: Runs) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for cell in cells:
        row: dict[str, Any] = {"cell": asdict(cell), "servers": {}, "ratios": {}}
        for name, passes in runs.items():
            got = [p[cell.name] for p in passes if p and cell.name in p]
            if got:
                row["servers"][name] = combine(got)
        for x, ref in COMPARISONS:
            if r := ratio(cell, runs, x, ref):
                row["ratios"][f"{x}/{ref}"] = r
        if cell.lora:  # what the adapter costs each server: LoRA cell over the same server's base cell
            base = cell.name.removeprefix("lora-")
            for name in runs:
                if r := ratio(cell, runs, name, name, ref_cell=base):
                    row["ratios"][f"{name} lora/base"] = r
        table[cell.name] = row
    return table


def goals(cells: list[Cell], table: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals for full secondstage (c) at 16 and 64 clients, cell by cell, with the noise verdicts."""
    out: dict[str, Any] = {}
    for cell in cells:
        if cell.concurrency not in (16, 64) or cell.lora:
            continue
        rs = table[cell.name]["ratios"]
        cr, ca = rs.get("c/r"), rs.get("c/a")
        out[cell.name] = {
            "c/r>=0.85": None if cr is None else cr["median"] >= 0.85,
            "c/a>=1.0": None if ca is None else ca["median"] >= 1.0,
            "c/a verdict": None if ca is None else ca["verdict"],
            "added_ttft_p50_le_5ms": (
                None if cr is None or cr["added_ttft_p50_ms"] is None else cr["added_ttft_p50_ms"] <= 5.0
            ),
        }
    return out


def _r(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    mark = {"inside the noise": "~", "faster": "+", "slower": "-"}.get(r["verdict"], "?")
    return f"{r['median']:.2f}{mark} {r['min']:.2f}-{r['max']:.2f}"


def _cores(s: dict[str, Any] | None) -> str:
    if not s or s.get("server_cores") is None:
        return "-"
    return f"{s['server_cores']:.1f}+{s['client_cores']:.1f}"


def print_table(cells: list[Cell], table: dict[str, Any]) -> None:
    t = Table(
        title="Serving sweep. Ratios pass by pass: median, mark, min-max (+ every pass above 1, - every pass below, "
        "~ inside the noise, ? one pass). Cores: CPU cores used, server tree + load generator."
    )
    cols = ["cell", "r rate ±spread", "a/r", "b/r", "c/r", "c/a", "r TTFT", "+TTFT a", "+TTFT c", "c TTFT p99"]
    cols += ["cores r", "cores a", "cores c", "err"]
    for col in cols:
        t.add_column(col, justify="left" if col == "cell" else "right", no_wrap=True)
    for cell in cells:
        row = table[cell.name]
        sv, rs = row["servers"], row["ratios"]
        raw = sv.get("r") or {}
        spread = raw.get(f"{cell.metric}_spread")
        rate = "-" if not raw else f"{fmt(raw.get(cell.metric), 0)}{'/s' if cell.metric == 'req_per_s' else ''}"
        if spread is not None:
            rate += f" ±{50 * spread:.0f}%"
        cr, ar = rs.get("c/r"), rs.get("a/r")
        t.add_row(
            cell.name,
            rate,
            _r(ar),
            _r(rs.get("b/r")),
            _r(cr),
            _r(rs.get("c/a")),
            fmt(raw.get("ttft_p50_ms")),
            "-" if ar is None else fmt(ar["added_ttft_p50_ms"]),
            "-" if cr is None else fmt(cr["added_ttft_p50_ms"]),
            fmt((sv.get("c") or {}).get("ttft_p99_ms")),
            _cores(sv.get("r")),
            _cores(sv.get("a")),
            _cores(sv.get("c")),
            str(sum(s.get("errors", 0) for s in sv.values())),
        )
    console.print(t)
    console.print(
        "rates: output tokens/s (req/s where marked /s) of the raw engine, median over passes ± half the spread"
    )
    lora = [c for c in cells if c.lora]
    if lora:
        t = Table(title="LoRA adapter against base, same server, same pass")
        for col in ("cell", "r lora/base", "a lora/base", "b lora/base", "c lora/base", "c/a (lora)", "c/r (lora)"):
            t.add_column(col, justify="left" if col == "cell" else "right", no_wrap=True)
        for cell in lora:
            rs = table[cell.name]["ratios"]
            t.add_row(
                cell.name,
                *[_r(rs.get(f"{s} lora/base")) for s in "rabc"],
                _r(rs.get("c/a")),
                _r(rs.get("c/r")),
            )
        console.print(t)


CPU_ROLES = ("frontend", "engine_core", "engine_worker", "redis", "load_generator")
"""Where a request's CPU goes (`bench.harness.cpu_by_process`; Redis for full secondstage; the load generator
for the HTTP servers: the raw engine has none)."""


def cpu_rows(cells: list[Cell], table: dict[str, Any]) -> list[tuple[str, str, list[float | None], float]]:
    """(cell, server, CPU ms per request by `CPU_ROLES`, total) at 16 and 64 clients — the goals' cells: on two
    cores every millisecond a request costs outside the engine is one the engine does not get."""
    rows = []
    for cell in cells:
        if cell.concurrency not in (16, 64):
            continue
        for name, s in table[cell.name]["servers"].items():
            ms = [s.get(f"cpu_ms_{role}") for role in CPU_ROLES]
            if any(x is not None for x in ms):
                rows.append((cell.name, name, ms, sum(x or 0.0 for x in ms)))
    return rows


def print_cpu_table(cells: list[Cell], table: dict[str, Any]) -> None:
    t = Table(title="CPU milliseconds per request by process, median over passes (16 and 64 clients)")
    for col in ("cell", "server", *CPU_ROLES, "total"):
        t.add_column(col, justify="left" if col in ("cell", "server") else "right", no_wrap=True)
    for cell, name, ms, total in cpu_rows(cells, table):
        t.add_row(cell, LABELS.get(name, name), *[fmt(x) for x in ms], fmt(total))
    console.print(t)


def markdown(cells: list[Cell], table: dict[str, Any]) -> str:
    """The sweep as a Markdown table (README's Performance section is pasted from it)."""

    def r(x: dict[str, Any] | None) -> str:
        if x is None:
            return "-"
        mark = {"inside the noise": " ~", "faster": " ↑", "slower": " ↓"}.get(x["verdict"], "")
        return f"{x['median']:.2f}{mark}"

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:+.0f}"

    lines = [
        "| cell | raw engine | vLLM/raw | bare/raw | full/raw | full/vLLM | TTFT raw ms | +TTFT vLLM | +TTFT full "
        "| cores raw / vLLM / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell in cells:
        row = table[cell.name]
        sv, rs = row["servers"], row["ratios"]
        raw = sv.get("r") or {}
        unit = " req/s" if cell.metric == "req_per_s" else " tok/s"
        spread = raw.get(f"{cell.metric}_spread")
        rate = "-" if not raw else f"{raw[cell.metric]:,.0f}{unit}" + (f" ±{50 * spread:.0f}%" if spread else "")
        ar, cr = rs.get("a/r"), rs.get("c/r")
        ttft = (sv.get("r") or {}).get("ttft_p50_ms")
        cores = " / ".join(_cores(sv.get(k)) for k in "rac")
        lines.append(
            f"| {cell.name} | {rate} | {r(ar)} | {r(rs.get('b/r'))} | {r(cr)} | {r(rs.get('c/a'))} "
            f"| {'-' if ttft is None else f'{ttft:.0f}'} | {ms(ar and ar['added_ttft_p50_ms'])} "
            f"| {ms(cr and cr['added_ttft_p50_ms'])} | {cores} |"
        )
    lines += ["", "| cell | server | " + " | ".join(CPU_ROLES) + " | total (CPU ms per request) |"]
    lines.append("|---|---|" + "---:|" * (len(CPU_ROLES) + 1))
    for cell_name, name, cpu, total in cpu_rows(cells, table):
        cols = " | ".join("-" if x is None else f"{x:.1f}" for x in cpu)
        lines.append(f"| {cell_name} | {LABELS.get(name, name)} | {cols} | {total:.1f} |")
    return "\n".join(lines)


def report() -> None:
    """Print the last run's tables again (bench/results/serving.json), with the Markdown version."""
    data = load_result("serving")
    if data is None:
        raise SystemExit("no bench/results/serving.json: run the benchmark first")
    cells = [Cell(**{k: v for k, v in c.items() if k != "name"}) for c in data["cells"]]
    print_table(cells, data["table"])
    print_cpu_table(cells, data["table"])
    console.print(f"load avg at each server start: {[round(x, 1) for x in data['loadavg_1m_at_each_start']]}")
    print(markdown(cells, data["table"]))


def save(
    args: Any,
    cells: list[Cell],
    table: dict[str, Any],
    errors: dict[str, list[str]],
    loadavg: list[float],
    started: float,
    *,
    partial: bool,
) -> Path:
    return write_result(
        "serving",
        {
            "partial": partial,
            "params": {k: v for k, v in vars(args).items() if k not in ("litellm", "report")},
            "labels": {k: LABELS[k] for k in args.only},
            "engine": f"bench.harness.BENCH_ENGINE (ServeSettings defaults: max_num_seqs 64, max_model_len 1024, "
            f"block_size {args.engine.block_size})",
            "cells": [asdict(c) | {"name": c.name} for c in cells],
            "table": table,
            "goals": goals(cells, table),
            "errors": errors,
            "loadavg_1m_at_each_start": loadavg,
            "total_s": time.monotonic() - started,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one cell of each kind, small sizes (a smoke run)")
    p.add_argument("--passes", type=int, default=3, help="passes over the servers, in alternating order")
    p.add_argument("--only", default="rabc", help="which servers, e.g. 'rc' (d: LiteLLM's proxy, off by default)")
    p.add_argument(
        "--cells",
        default="",
        help="run only cells whose name contains this, e.g. 'c16-' ('^c16-': begins with it); several "
        "comma-separated: any of them",
    )
    p.add_argument("--grid", action="store_true", help="add the 256-client cells the default leaves out")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every cell's requests (at least 1 per client)")
    p.add_argument("--litellm", default=None, help="path of a `litellm` executable for (d)")
    p.add_argument(
        "--bare-prompts",
        action="store_true",
        help="send the other servers the bare prompts (full secondstage then also prefills its instructions)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help=f"KV-cache block size for every server (default {BENCH_ENGINE.block_size}: an A/B of the block size)",
    )
    p.add_argument("--report", action="store_true", help="print the last run's tables (and Markdown); run nothing")
    args = p.parse_args()
    args.engine = BENCH_ENGINE if args.block_size is None else replace(BENCH_ENGINE, block_size=args.block_size)
    if args.report:
        report()
        return
    args.system = None if args.bare_prompts else instructions_message(ROOT / "policies")
    if not args.only or set(args.only) - set(LABELS):
        p.error(f"--only={args.only!r}: use letters from {''.join(LABELS)}")
    if args.passes < 1:
        p.error(f"--passes={args.passes} must be at least 1")
    if args.scale <= 0:
        p.error(f"--scale={args.scale} must be above 0")
    wanted = args.cells.split(",")
    cells = [
        c
        for c in sweep(args.quick, args.scale, args.grid)
        if any(c.name.startswith(w[1:]) if w.startswith("^") else w in c.name for w in wanted)
    ]
    if not cells:
        p.error(f"--cells={args.cells!r} matches no cell; names look like {sweep(True)[0].name}")

    from bench.swap import make_adapters  # peft and transformers: imported only when the sweep runs

    ensure_demo_model()
    work = short_tmpdir("ssbench-serving-")
    adapter = make_adapters(1, work / "adapters")[0]
    steps = plan(cells)
    console.print(
        f"{len(cells)} cells × {len(args.only)} servers × {args.passes} passes; "
        f"{sum(c.requests for c in cells)} measured requests per server and pass; load avg {os.getloadavg()[0]:.1f}"
    )
    # runs[server][pass]: None where that pass failed, so ratios pair only passes both servers finished.
    runs: dict[str, list[dict[str, Any] | None]] = {name: [None] * args.passes for name in args.only}
    errors: dict[str, list[str]] = {}
    started = time.monotonic()
    loadavg: list[float] = []
    with PrivateRedis(work / "redis") as rs:
        for rep in range(args.passes):
            # Every other pass in reverse order, so a drift in the machine's load hits each server alike.
            order = args.only if rep % 2 == 0 else args.only[::-1]
            for name in order:
                loadavg.append(os.getloadavg()[0])
                try:
                    runs[name][rep] = run_one(name, rep, steps, work, rs, adapter, args)
                except (RuntimeError, httpx.HTTPError, subprocess.TimeoutExpired) as exc:
                    # A server that fails is reported and left out; the others still run.
                    errors.setdefault(name, []).append(str(exc)[:2000])
                    console.print(f"[red]{name} pass {rep + 1} failed:[/] {str(exc)[:500]}")
                # Saved after every server pass: a run stopped half-way still leaves what it measured.
                save(args, cells, analyse(cells, runs), errors, loadavg, started, partial=True)
    table = analyse(cells, runs)
    print_table(cells, table)
    print_cpu_table(cells, table)
    for name, g in goals(cells, table).items():
        console.print(f"goal {name}: {g}")
    path = save(args, cells, table, errors, loadavg, started, partial=False)
    console.print(f"wrote {path} ({time.monotonic() - started:.0f}s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
