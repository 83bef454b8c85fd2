"""Output-filter cost: microseconds per streamed chunk with 10 vs 200 rules, and feed() throughput.

    .venv/bin/python -m bench.policy_bench   # prints a table, writes bench/results/policy_bench.json

Rule sets are generated deterministically (fixed seed): presets from the shipped defaults plus
keyword and regex rules. The text is English-like prose with a few secrets and PII mixed in, fed
in token-sized chunks (1-6 characters). This measures the filter alone; tokens/s through the real
server with policies on vs off is a separate, end-to-end measurement.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.results import RESULTS
from core.policy import PolicyEngine, RequestContext

PRESETS = ["email", "phone", "credit_card", "us_ssn", "openai_key", "aws_access_key", "github_token", "private_key"]
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
]


def make_rules(n: int, seed: int = 7) -> str:
    """`n` rules: the presets first, then alternating keyword and regex rules."""
    rng = random.Random(seed)
    lines = ["rules:"]
    for i in range(n):
        if i < len(PRESETS):
            lines.append(f"  - {{id: p{i}, description: preset, kind: preset, preset: {PRESETS[i]}, action: redact}}")
        elif i % 2:
            kws = ", ".join(f"zq{rng.randrange(10**6)}x{rng.choice(WORDS)}" for _ in range(3))
            lines.append(f"  - {{id: k{i}, description: kw, kind: keywords, keywords: [{kws}], action: redact}}")
        else:
            prefix = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(3))
            pattern = f"'\\b{prefix}-[0-9]{{4,8}}\\b'"
            lines.append(f"  - {{id: r{i}, description: re, kind: regex, pattern: {pattern}, action: redact}}")
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


def run_filter(engine: PolicyEngine, chunks: list[str], active: bool = True) -> tuple[float, str]:
    ctx = RequestContext(None, None, "bench" if active else "off")
    f = engine.output_filter(ctx)
    t0 = time.perf_counter()
    for c in chunks:
        f.feed(c)
    f.finish()
    return time.perf_counter() - t0, f.final_text


def engine_for(rules: str, directory: Path) -> tuple[PolicyEngine, float]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(rules)
    engine = PolicyEngine(directory)
    t0 = time.perf_counter()
    engine.load()
    return engine, time.perf_counter() - t0


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    text = make_text(20_000)
    chunks = chunks_of(text)
    results: dict[str, object] = {"chunks": len(chunks), "chars": len(text), "rule_sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # Policies off: a filter with no active rule (scope excludes the model) is the baseline.
        off_rule = "{id: x, description: x, kind: keywords, keywords: [x], action: flag, scope: {models: [bench]}}"
        off_rules = f"rules:\n  - {off_rule}\n"
        off_engine, _ = engine_for(off_rules, Path(tmp) / "off")
        off_times = [run_filter(off_engine, chunks, active=False)[0] for _ in range(3)]
        off_us = statistics.median(off_times) / len(chunks) * 1e6
        results["off_us_per_chunk"] = round(off_us, 2)
        rows = [("off (no rules)", "-", f"{off_us:.2f}", f"{len(text) / statistics.median(off_times) / 1e6:.2f}")]
        for n in (10, 200):
            engine, compile_s = engine_for(make_rules(n), Path(tmp) / f"r{n}")
            times = []
            for _ in range(3):
                dt, final = run_filter(engine, chunks)
                times.append(dt)
            whole_dt, whole = run_filter(engine, [text])
            assert whole == final, "chunked and whole feeds must give the same text"
            med = statistics.median(times)
            us = med / len(chunks) * 1e6
            results["rule_sets"][str(n)] = {  # type: ignore[index]
                "rules": n,
                "compile_s": round(compile_s, 3),
                "us_per_chunk": round(us, 2),
                "mchars_per_s": round(len(text) / med / 1e6, 3),
                "chunks_per_s": round(len(chunks) / med),
                "whole_text_s": round(whole_dt, 4),
                "hold_back_chars": engine.active.hold_back,
                "redactions": final.count("[") - text.count("["),
            }
            rows.append((f"{n} rules", f"{compile_s:.2f}", f"{us:.2f}", f"{len(text) / med / 1e6:.2f}"))
    print(f"text: {len(text)} chars in {len(chunks)} chunks of 1-6 chars")
    print(f"{'rule set':<16}{'compile s':>10}{'us/chunk':>10}{'Mchar/s':>10}")
    for row in rows:
        print(f"{row[0]:<16}{row[1]:>10}{row[2]:>10}{row[3]:>10}")
    out = RESULTS / "policy_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
