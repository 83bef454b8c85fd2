"""Policy cost against the number of rules: output filter per streamed chunk, input check, compile and reload stall.

    .venv/bin/python -m bench.policy_bench [--quick] [--rules 10,50,100,200,500,1000] [--passes 3]

For each rule-set size (every preset, then keyword and regex rules, all on both stages) it measures:

- output filter: microseconds per streamed chunk (1-6 characters, like token deltas) over English-like
  prose with a few secrets and PII mixed in, and per 64-token response (filter creation included);
- input check: milliseconds for a 4,000-character prompt;
- compile: seconds to load the set (what a reload costs, off the event loop);
- reload stall: the event loop's largest gap (a 1 ms ticker) while `reload_off_loop()` recompiles the set,
  beside the same ticker's largest gap without a reload.

The keyword rules are the hard case for a streaming filter: each keyword starts with a common English word
("thewas12"), so most chunks end in text that could still begin dozens of them. Rule sets are generated
deterministically (fixed seed). Sizes are measured in alternating passes (10, 50, …, 1000, then again) and
the median is kept, so a burst of load on a shared machine hits every size alike. Prints a table; writes
bench/results/policy_bench.json and bench/results/policy_bench.png. Figures only: nothing here fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.results import write_result
from core.policy import PolicyEngine, RequestContext
from core.policy.presets import PRESETS

console = Console(width=130)
CTX = RequestContext(None, None, "bench")
WORDS = str.split(
    "the of and to in is was for on are with as his they at be this from have or by one had not but what all were when "
    "we there can an your which their said if do will each about how up out them then she many some so these would "
    "other into has more her two like him see time could no make than first been its who now people my made over did"
)
SPICE = [
    "write to jane.doe@example.com",
    "card 4111 1111 1111 1111",
    "key sk-proj-abcdefghijklmnopqrstuvwxyz0123",
    "call (555) 123-4567",
    "id TCK-20931",
    "password = hunter2hunter2hunter2",
]


def make_rules(n: int, seed: int = 7) -> str:
    """`n` rules on both stages: every preset first, then alternating keyword and regex rules."""
    rng = random.Random(seed)
    presets = sorted(PRESETS)
    lines = ["rules:"]
    both = "stages: [input, output]"
    for i in range(n):
        if i < len(presets):
            lines.append(
                f"  - {{id: p{i}, description: preset, kind: preset, preset: {presets[i]}, action: redact, {both}}}"
            )
        elif i % 2:
            kws = ", ".join(f"{rng.choice(WORDS)}{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(3))
            lines.append(
                f"  - {{id: k{i}, description: kw, kind: keywords, keywords: [{kws}], action: redact, {both}}}"
            )
        else:
            prefix = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3))
            pattern = f"'\\b{prefix}-[0-9]{{4,8}}\\b'"
            lines.append(
                f"  - {{id: r{i}, description: re, kind: regex, pattern: {pattern}, case_sensitive: false, "
                f"action: redact, {both}}}"
            )
    return "\n".join(lines) + "\n"


def make_text(n_words: int, seed: int = 11) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(rng.choice(WORDS))
        if i % 400 == 399:
            out.append(rng.choice(SPICE))
        if i % 17 == 16:
            out[-1] += "."
    return " ".join(out)


def chunks_of(text: str, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        out.append(text[i : i + k])
        i += k
    return out


def run_filter(engine: PolicyEngine, chunks: list[str]) -> tuple[float, str]:
    """Seconds to stream `chunks` through one fresh output filter, and the text it emitted."""
    t0 = time.perf_counter()
    f = engine.output_filter(CTX)
    out = [f.feed(c).text for c in chunks]
    out.append(f.finish().text)
    return time.perf_counter() - t0, "".join(out)


def response_cost(engine: PolicyEngine, responses: list[list[str]]) -> float:
    """Microseconds per chunk over many short responses, each with its own filter (creation included)."""
    t0 = time.perf_counter()
    chunks = 0
    for r in responses:
        f = engine.output_filter(CTX)
        for c in r:
            f.feed(c)
        f.finish()
        chunks += len(r)
    return (time.perf_counter() - t0) / chunks * 1e6


def input_cost(engine: PolicyEngine, prompt: str, reps: int) -> float:
    """Milliseconds per input check of one user message `prompt` (median of `reps`)."""
    messages = [{"role": "user", "content": prompt}]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.check_input(messages, CTX)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def _loop_gaps(engine: PolicyEngine | None) -> tuple[float, list[float]]:
    """A 1 ms ticker's gaps (s) while `engine` reloads off the loop (or for 0.3 s idle); and the reload's length."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    gaps.clear()
    t0 = time.perf_counter()
    if engine is None:
        await asyncio.sleep(0.3)
    else:
        result = await engine.reload_off_loop(announce=False)
        assert result.ok, result.error
    elapsed = time.perf_counter() - t0
    stop.set()
    await task
    return elapsed, gaps


def reload_stall(engine: PolicyEngine) -> dict[str, float]:
    _, idle = asyncio.run(_loop_gaps(None))
    reload_s, gaps = asyncio.run(_loop_gaps(engine))
    gaps.sort()
    return {
        "reload_s": round(reload_s, 3),
        "max_gap_ms": round(1e3 * gaps[-1], 1),
        "p99_gap_ms": round(1e3 * gaps[int(0.99 * (len(gaps) - 1))], 1),
        "idle_max_gap_ms": round(1e3 * max(idle), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="sizes 10, 200, 1000, a shorter text, 2 passes, one reload (~1 min)"
    )
    p.add_argument("--rules", default=None, help="comma-separated rule-set sizes (default 10,50,100,200,500,1000)")
    p.add_argument("--passes", type=int, default=None, help="alternating passes over the sizes (default 3)")
    args = p.parse_args()
    sizes = [int(s) for s in (args.rules or ("10,200,1000" if args.quick else "10,50,100,200,500,1000")).split(",")]
    passes = args.passes or (2 if args.quick else 3)
    if min(sizes) < 1 or passes < 1:
        p.error(f"--rules {sizes} and --passes {passes} must be positive")

    text = make_text(5_000 if args.quick else 20_000)
    chunks = chunks_of(text)
    prompt = make_text(1_000, seed=5)[:4_000]
    # 64-token responses: ~4 characters a token, in the same 1-6 character deltas.
    responses = [chunks_of(text[i : i + 256], seed=i) for i in range(0, min(len(text), 256 * 200), 256)]
    results: dict[str, Any] = {
        "quick": args.quick,
        "passes": passes,
        "text_chars": len(text),
        "chunks": len(chunks),
        "prompt_chars": len(prompt),
        "sizes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        engines: dict[int, PolicyEngine] = {}
        for n in [0, *sizes]:
            directory = Path(tmp) / f"r{n}"
            directory.mkdir()
            (directory / "rules.yaml").write_text(make_rules(n) if n else "rules: []\n")
            engine = PolicyEngine(directory)
            t0 = time.perf_counter()
            engine.load()
            results["sizes"][str(n)] = {"rules": n, "compile_s": round(time.perf_counter() - t0, 3)}
            engines[n] = engine
            console.print(f"{n} rules compiled in {results['sizes'][str(n)]['compile_s']:.2f}s")

        per: dict[int, dict[str, list[float]]] = {n: {"chunk": [], "resp": [], "input": []} for n in engines}
        reference: str | None = None
        for k in range(passes):
            for n, engine in engines.items():
                dt, out = run_filter(engine, chunks)
                if n:
                    # Every size redacts the same spice (the extra rules never match): the same text comes out.
                    reference = reference or out
                    assert out == reference, f"{n} rules changed the output"
                per[n]["chunk"].append(dt / len(chunks) * 1e6)
                per[n]["resp"].append(response_cost(engine, responses))
                per[n]["input"].append(input_cost(engine, prompt, reps=10 if args.quick else 30))
            console.print(f"pass {k + 1}/{passes} done")
        for n in engines:
            entry = results["sizes"][str(n)]
            entry["us_per_chunk"] = round(statistics.median(per[n]["chunk"]), 2)
            entry["us_per_chunk_passes"] = [round(v, 2) for v in per[n]["chunk"]]
            entry["us_per_chunk_in_64_token_responses"] = round(statistics.median(per[n]["resp"]), 2)
            entry["input_4k_ms"] = round(statistics.median(per[n]["input"]), 3)
            entry["hold_back_chars"] = engines[n].active.hold_back if n else 0
        # --quick: one reload, of a mid-size set (a 1,000-rule reload alone takes 10-40 s on this machine).
        stall_sizes = [sorted(sizes)[len(sizes) // 2]] if args.quick else sizes
        for n in stall_sizes:
            results["sizes"][str(n)]["reload"] = reload_stall(engines[n])
            console.print(f"{n} rules: reload {results['sizes'][str(n)]['reload']}")

    base = results["sizes"][str(min(sizes))]["us_per_chunk"]
    top = results["sizes"][str(max(sizes))]["us_per_chunk"]
    results["flatness"] = {"ratio_largest_to_smallest_us_per_chunk": round(top / base, 3) if base else None}
    t = Table(title=f"Policies against the number of rules ({len(chunks):,} chunks of 1-6 chars; median of {passes})")
    for col in ("rules", "compile s", "µs/chunk", "µs/chunk (64-tok resp)", "input 4k ms", "reload s", "loop max gap"):
        t.add_column(col, justify="right")
    for n in engines:
        e = results["sizes"][str(n)]
        r = e.get("reload")
        t.add_row(
            str(n) if n else "0 (off)",
            f"{e['compile_s']:.2f}",
            f"{e['us_per_chunk']:.2f}",
            f"{e['us_per_chunk_in_64_token_responses']:.2f}",
            f"{e['input_4k_ms']:.3f}",
            f"{r['reload_s']:.2f}" if r else "-",
            f"{r['max_gap_ms']:.0f} ms (idle {r['idle_max_gap_ms']:.0f})" if r else "-",
        )
    console.print(t)
    console.print(f"per-chunk cost at {max(sizes)} rules / at {min(sizes)} rules: x{results['flatness']}")
    console.print(f"wrote {write_result('policy_bench', results)}")
    from bench.plot import plot

    plot(["policy_bench"])


if __name__ == "__main__":
    main()
