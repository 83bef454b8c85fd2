"""The load generator the serving benchmarks share: prompts, one request's figures, a closed-loop HTTP run.

    stats = asyncio.run(drive_http(server.url, cell_requests, stream=True, concurrency=16, warmup=4))

`concurrency` clients (asyncio tasks on one aiohttp session) each send their next request as soon as the last
one finished, until `requests` are done; every request has its own prompt (`prompt(i, words)`: a number in
front, so no two share more than the chat template's prefix and the prefix cache cannot turn the benchmark
into a cache test) and asks for exactly `max_tokens` tokens (`ignore_eos`). bench/raw_engine.py produces the
same `Sample`s without HTTP, so every row of the serving table is computed by `summarise`.

The client is aiohttp, not httpx, because the load generator runs on the same cores as the server it measures:
reading a 64-token stream cost httpx (`aiter_lines`) 12-13 ms of CPU against aiohttp's 1.3-1.4 ms (a trivial SSE
server, 64 clients, 3 rounds), and at 64 clients that difference was a sixth of all the CPU a request cost the
machine (README Performance, "Where the CPU goes").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.results import percentile

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
SHORT_WORDS = 20
"""~50 prompt tokens once the demo model's chat template is applied."""
LONG_WORDS = 480
"""~850 prompt tokens templated: with the ~95 tokens of instructions the default policies prepend and 64
tokens out it still fits the 1,024-token context (the demo model's own limit)."""


def prompt(i: int, words: int) -> str:
    """The i-th request's user message: `words` words after a number no other request in the run has."""
    return f"Request {i}: " + " ".join(WORDS[k % len(WORDS)] for k in range(words))


@dataclass
class Sample:
    ok: bool
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def summarise(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    """Rates over the measured run's wall time, percentiles over its successful requests."""
    ok = [s for s in samples if s.ok]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    lats = [s.latency for s in ok]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if not s.ok), None),
        "wall_s": wall_s,
        "req_per_s": len(ok) / wall_s if wall_s else 0.0,
        "out_tok_per_s": sum(s.completion_tokens for s in ok) / wall_s if wall_s else 0.0,
        "completion_tokens_mean": sum(s.completion_tokens for s in ok) / len(ok) if ok else 0.0,
        "prompt_tokens_mean": sum(s.prompt_tokens for s in ok) / len(ok) if ok else 0.0,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "latency_p50_ms": _ms(percentile(lats, 50)),
        "latency_p99_ms": _ms(percentile(lats, 99)),
    }


def chat_body(model: str, content: str, max_tokens: int, stream: bool, system: str | None = None) -> dict[str, Any]:
    """One load request; `system`, if given, goes first as a system message (bench/serving.py's equal prompts)."""
    messages = [{"role": "user", "content": content}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def one_http(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Sample:
    """One chat completion; TTFT is the first chunk with content (streams only)."""
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                text = (await r.read()).decode(errors="replace")
                return Sample(False, time.perf_counter() - t0, error=f"HTTP {r.status}: {text[:200]}")
            if not body["stream"]:
                usage = json.loads(await r.read()).get("usage") or {}
                latency = time.perf_counter() - t0
                return Sample(True, latency, None, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))
            ttft, chunks, usage = None, 0, {}
            async for line in r.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
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
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: bad JSON, a line over the limit
        return Sample(False, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")


def cpu_ms_per_request(used: dict[str, float], requests: int) -> dict[str, float]:
    """`cpu_ms_<role>`: the CPU milliseconds per request each role (`bench.harness.cpu_by_process`) used."""
    return {f"cpu_ms_{role}": 1e3 * seconds / max(requests, 1) for role, seconds in used.items()}


async def drive_http(
    base_url: str,
    bodies: list[dict[str, Any]],
    *,
    concurrency: int,
    warmup: list[dict[str, Any]],
    headers: dict[str, str] | None = None,
    server_cpu: Callable[[], dict[str, float]] | None = None,
) -> tuple[list[Sample], float, dict[str, float]]:
    """Send `warmup` (all at once, unmeasured), then `bodies` through `concurrency` clients.

    Returns the samples, the wall seconds of the measured part, and the CPU it used: cores on average,
    `client_cores` (this process: the load generator) and `server_cores` (the sum of `server_cpu()`'s CPU seconds
    by role), and milliseconds per request, `cpu_ms_<role>` for each role and `cpu_ms_load_generator`.
    """
    url = base_url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as client:
        warm = await asyncio.gather(*[one_http(client, url, b) for b in warmup])
        if warm and not any(s.ok for s in warm):
            raise RuntimeError(f"every warm-up request to {url} failed; first: {warm[0].error}")
        queue = list(reversed(bodies))
        samples: list[Sample] = []

        async def client_task() -> None:
            while queue:
                samples.append(await one_http(client, url, queue.pop()))

        srv0, cli0 = server_cpu() if server_cpu else {}, time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*[client_task() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
        srv1, cli1 = server_cpu() if server_cpu else {}, time.process_time()
    used = {role: srv1[role] - srv0.get(role, 0.0) for role in srv1}
    cores = {"client_cores": (cli1 - cli0) / wall, "server_cores": sum(used.values()) / wall}
    cores |= cpu_ms_per_request(used | {"load_generator": cli1 - cli0}, len(bodies))
    return samples, wall, cores
