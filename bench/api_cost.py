"""What secondstage's API process costs per request and per streamed chunk, in CPU time, with the engine taken out.

    .venv/bin/python -m bench.api_cost [--requests 400] [--clients 16] [--tokens 64] [--configs full,bare]
    .venv/bin/python -m bench.api_cost --loop uvloop --http httptools     # an A/B of uvicorn's event loop / parser

The real app (`serve.app.build_app`: middleware, auth, rate limits, the default policies of policies/, the
Redis log writer into a real redis-server) runs under real uvicorn in a subprocess, with the options `secondstage
serve` uses (`serve.cli.UVICORN_OPTIONS`), over a *fake engine* that answers every request with `--tokens`
tokens at once (no model: a step per token, `asyncio.sleep(0)` between them) and the demo model's real
tokenizer, so the chat template and tokenization cost what they cost in serve. A load of `--clients`
concurrent clients (bench/load.py, the serving benchmark's bodies) sends `--requests` measured requests per
cell after a warm-up; the server process' CPU time (user + system, psutil) over the measured requests, divided by
their number, is the cost of one request. CPU seconds, not wall seconds: on a shared machine the load moves wall
time a lot and CPU time much less (cache and frequency effects remain: compare configurations run side by side).

Cells: streamed and JSON, `--tokens` tokens and 1 token. Per streamed chunk = (streamed N − streamed 1) / (N − 1),
per JSON token likewise; per request = the 1-token cell. Configurations: `full` (default policies + logging,
as `secondstage serve` runs) and `bare` (SECONDSTAGE_POLICIES_ENABLED=false, SECONDSTAGE_LOGGING_ENABLED=false).
redis-server's CPU is reported beside (it runs on the same cores in a one-machine deployment).

What it leaves out: vLLM's own work in the API process (the engine client's output processing and
detokenization, which vLLM's OpenAI server pays too). Figures are printed and written to
bench/results/api_cost.json; nothing is judged.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.harness import DEMO, PYTHON, ROOT, ServerProcess, free_port, running, short_tmpdir
from bench.load import SHORT_WORDS, chat_body, drive_http, prompt
from bench.results import write_result

console = Console(width=200)

ANSWER = (
    "The quick brown fox jumps over the lazy dog while seven small birds sing in the tall green trees, "
    "and the river runs on past the old mill to the sea. "
) * 8
"""What the fake engine says, one demo-tokenizer token at a time (ordinary prose, as the output filter sees)."""


# -- the server side: the real app over a fake engine ------------------------------------------------------------


@dataclass
class _Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: Any = None
    finish_reason: str | None = None


@dataclass
class _Output:
    request_id: str
    outputs: list[_Completion]
    finished: bool


class InstantLLM:
    """vLLM's AsyncLLM surface, answering `ANSWER`'s tokens at once: one output per token for DELTA (streams),
    one output at the end with the whole text for FINAL_ONLY (JSON requests), as vLLM yields them."""

    def __init__(self, tokenizer: Any) -> None:
        ids = tokenizer.encode(ANSWER, add_special_tokens=False)
        # Each token's text as the detokenizer gives it (the difference of the growing prefix's decodings).
        self.pieces: list[tuple[int, str]] = []
        done = ""
        for k, token in enumerate(ids):
            text = tokenizer.decode(ids[: k + 1])
            self.pieces.append((token, text[len(done) :]))
            done = text

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[_Output]:
        count = min(params.max_tokens, len(self.pieces))
        final_only = params.output_kind.name == "FINAL_ONLY"
        for step in range(count):
            await asyncio.sleep(0)  # an engine step: other requests run between two outputs
            token, text = self.pieces[step]
            finish = "length" if step == count - 1 else None
            if final_only:
                if finish is None:
                    continue
                pieces = self.pieces[:count]
                text, tokens = "".join(t for _, t in pieces), [k for k, _ in pieces]
            else:
                tokens = [token]
            outs = [_Completion(i, text, tokens, None, finish) for i in range(params.n)]
            yield _Output(request_id, outs, finish is not None)

    async def abort(self, request_id: str | list[str]) -> None:
        pass

    async def add_lora(self, lora_request: Any) -> bool:
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return True

    async def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def serve(port: int, config: str, redis_url: str, var_dir: Path, loop: str | None, http: str | None) -> None:
    """Run the app with the fake engine under uvicorn until killed (the server process the parent measures)."""
    import uvicorn
    from transformers import AutoTokenizer

    from core.versions import VersionStore
    from serve.app import build_app
    from serve.cli import UVICORN_OPTIONS
    from serve.engine import ModelEngine
    from serve.settings import ServeSettings

    full = config == "full"
    settings = ServeSettings(
        var_dir=var_dir,
        redis_url=redis_url,
        served_model_name="demo",
        model=str(DEMO),
        port=port,
        policies_dir=ROOT / "policies",
        policies_enabled=full,
        logging_enabled=full,
    )
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    engine = ModelEngine(
        InstantLLM(tokenizer),  # type: ignore[arg-type]
        tokenizer,
        model_name="demo",
        max_model_len=settings.max_model_len,
        store=VersionStore(settings.versions_dir),
    )
    options: dict[str, Any] = {**UVICORN_OPTIONS}
    if loop:
        options["loop"] = loop
    if http:
        options["http"] = http
    uvicorn.run(
        build_app(settings, engine=engine, own_process=True),  # as `secondstage serve`
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        **options,
    )


# -- the client side ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    tokens: int
    stream: bool
    clients: int | None = None
    """None: `--clients`; 1: the TTFT cell (one client: the API's own path to the first chunk, nothing queued)."""

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'json'}-o{self.tokens}" + (f"-c{self.clients}" if self.clients else "")


def cpu_of(pid: int) -> float:
    """CPU seconds of one process (all its threads, not its children).

    The scheduler's own count (`/proc/<pid>/task/*/schedstat`, nanoseconds) where there is one: psutil's
    user + system times tick in 10 ms steps, 25 µs per request over 400 requests. A thread that exited
    takes its time with it; the server's threads (the loop's, the thread pool's) live as long as it does.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        total = 0
    if total:
        return total / 1e9
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def measure(
    server: ServerProcess, redis_pid: int | None, cell: Cell, requests: int, clients: int
) -> dict[str, Any]:
    """One cell: a warm-up, then `requests` through `clients`; CPU µs per request of the server and of Redis."""
    assert server.proc is not None
    pid = server.proc.pid
    bodies = [chat_body("demo", prompt(i, SHORT_WORDS), cell.tokens, cell.stream) for i in range(requests)]
    warm = [chat_body("demo", prompt(10**6 + i, SHORT_WORDS), cell.tokens, cell.stream) for i in range(clients * 2)]
    readings: list[tuple[float, float]] = []

    def reading() -> dict[str, float]:
        readings.append((cpu_of(pid), cpu_of(redis_pid) if redis_pid else 0.0))
        return {}

    samples, wall, _ = await drive_http(server.url, bodies, concurrency=clients, warmup=warm, server_cpu=reading)
    ttfts = [s.ttft for s in samples if s.ok and s.ttft is not None]
    (api0, redis0), (api1, redis1) = readings
    errors = [s.error for s in samples if not s.ok]
    tokens = statistics.mean(s.completion_tokens for s in samples if s.ok) if len(errors) < len(samples) else 0.0
    return {
        "requests": requests,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "completion_tokens_mean": tokens,
        "wall_s": wall,
        "req_per_s": requests / wall,
        "api_us_per_request": (api1 - api0) / requests * 1e6,
        "redis_us_per_request": (redis1 - redis0) / requests * 1e6,
        "api_cores": (api1 - api0) / wall,
        "ttft_p50_ms": None if not ttfts else statistics.median(ttfts) * 1000,
    }


def derived(cells: dict[str, dict[str, Any]], tokens: int) -> dict[str, float | None]:
    """Per request (the 1-token cells) and per extra chunk / token ((N-token − 1-token) / (N − 1))."""

    def us(name: str) -> float | None:
        cell = cells.get(name)
        return None if cell is None else float(cell["api_us_per_request"])

    out: dict[str, float | None] = {}
    for mode in ("stream", "json"):
        one, many = us(f"{mode}-o1"), us(f"{mode}-o{tokens}")
        out[f"{mode}_us_per_request"] = one
        out[f"{mode}_us_per_{'chunk' if mode == 'stream' else 'token'}"] = (
            None if one is None or many is None or tokens <= 1 else (many - one) / (tokens - 1)
        )
    ttft = cells.get(f"stream-o{tokens}-c1", {}).get("ttft_p50_ms")
    out["ttft_1_client_ms"] = None if ttft is None else float(ttft)
    return out


def server_process(config: str, redis_url: str, tmp: Path, loop: str | None, http: str | None) -> ServerProcess:
    port = free_port()
    var_dir = tmp / f"var-{config}"
    argv = [PYTHON, "-m", "bench.api_cost", "--serve", config, "--port", str(port), "--redis-url", redis_url]
    argv += ["--var-dir", str(var_dir)]
    argv += ["--loop", loop] if loop else []
    argv += ["--http", http] if http else []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "SECONDSTAGE_VAR_DIR": str(var_dir)}
    return ServerProcess(f"api-cost-{config}", argv, env, port, tmp / f"{config}.log")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.redis_server import PrivateRedis

    tmp = short_tmpdir("api-cost-")
    cells = [
        Cell(args.tokens, True),
        Cell(args.tokens, False),
        Cell(1, True),
        Cell(1, False),
        Cell(args.tokens, True, 1),
    ]
    results: dict[str, Any] = {}
    load_before = os.getloadavg()[0]
    with PrivateRedis(tmp / "redis") as redis_server:
        for config in args.configs:
            server = server_process(config, redis_server.url, tmp, args.loop, args.http)
            t0 = time.monotonic()
            with running(server, timeout=180):
                by_cell: dict[str, Any] = {}
                for _ in range(args.passes):
                    for cell in cells:
                        requests = args.requests if cell.clients is None else max(4, args.requests // 8)
                        clients = cell.clients or args.clients
                        figures = asyncio.run(measure(server, redis_server.pid, cell, requests, clients))
                        by_cell.setdefault(cell.name, []).append(figures)
            # The median pass per cell (by API CPU per request): one slow pass on a shared machine does not move it.
            medians = {
                name: sorted(runs, key=lambda r: r["api_us_per_request"])[len(runs) // 2]
                for name, runs in by_cell.items()
            }
            results[config] = {
                "cells": medians,
                "passes": by_cell,
                "derived": derived(medians, args.tokens),
                "seconds": time.monotonic() - t0,
            }
    return {
        "args": {k: v for k, v in vars(args).items() if k != "serve"},
        "configs": results,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def report(data: dict[str, Any]) -> None:
    args = data["args"]
    table = Table(
        title=f"API process CPU per request (µs; {args['clients']} clients, {args['requests']} requests a cell, "
        f"loop={args['loop'] or 'serve default'}, http={args['http'] or 'serve default'})"
    )
    for col in ("config", "cell", "µs/request", "redis µs/req", "req/s", "TTFT p50 ms", "tokens", "errors"):
        table.add_column(col, justify="left" if col in ("config", "cell") else "right")
    for config, result in data["configs"].items():
        for name, cell in result["cells"].items():
            table.add_row(
                config,
                name,
                f"{cell['api_us_per_request']:,.0f}",
                f"{cell['redis_us_per_request']:,.0f}",
                f"{cell['req_per_s']:,.0f}",
                "-" if cell["ttft_p50_ms"] is None else f"{cell['ttft_p50_ms']:.2f}",
                f"{cell['completion_tokens_mean']:.0f}",
                str(cell["errors"]),
            )
    console.print(table)
    for config, result in data["configs"].items():
        d = result["derived"]
        parts = [f"{k.replace('_us_per_', ' µs/')}: {'-' if v is None else f'{v:,.1f}'}" for k, v in d.items()]
        console.print(f"{config}: " + ", ".join(parts))
    console.print(f"load average {data['loadavg_before']:.1f} → {data['loadavg_after']:.1f}")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400, help="measured requests per cell")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--tokens", type=int, default=64, help="tokens per answer in the N-token cells")
    p.add_argument("--passes", type=int, default=3, help="passes over the cells per server (the median is kept)")
    p.add_argument("--configs", default="full,bare", help="comma-separated: full, bare")
    p.add_argument("--loop", default=None, help="uvicorn's loop (asyncio, uvloop); default: what serve uses")
    p.add_argument("--http", default=None, help="uvicorn's HTTP parser (h11, httptools); default: what serve uses")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    p.add_argument("--label", default="api_cost", help="result file name: bench/results/<label>.json")
    # The server side (the parent starts it): not for users.
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--var-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.port, args.serve, args.redis_url, args.var_dir, args.loop, args.http)
        return None
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - {"full", "bare"}
    if unknown:
        p.error(f"--configs: unknown {sorted(unknown)}; choose from full, bare")
    if args.quick:
        args.requests, args.clients, args.passes = min(args.requests, 40), min(args.clients, 4), 1
    data = run(args)
    report(data)
    path = write_result(args.label, data)
    console.print(f"written to {path}")
    return data


if __name__ == "__main__":
    main()
