"""Every benchmark in sequence, then the plot and a one-screen summary (`make bench` runs this).

    .venv/bin/python -m bench.run_all [--quick] [--skip serving,swap]

Each benchmark runs as its own process (servers never overlap: the machine has 2 cores) and writes its
JSON to bench/results/; a benchmark that fails is reported and the rest still run. These print figures
and do not judge them: the exit status is 0 unless a benchmark crashed. `--quick` shrinks every size
(a smoke run of the whole chain in a few minutes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.harness import ROOT
from bench.results import load_result

BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (full arguments, --quick arguments)
    "policy_bench": ([], []),
    "logwriter": ([], ["--records", "20000", "--outage-records", "5000"]),
    "serving": ([], ["--requests", "32", "--concurrency", "8", "--only", "abc"]),
    "swap": ([], ["--versions", "2", "--idle-swaps", "3", "--swaps", "4"]),
    "closed_loop": ([], ["--rounds", "1", "--train", "16", "--heldout", "12"]),
}


def summary() -> list[str]:
    lines = []
    if (s := load_result("serving")) and s.get("ratios"):
        for name, modes in s["ratios"].items():
            st = modes["stream"]
            ttft = "-" if st["added_ttft_p50_ms"] is None else f"{st['added_ttft_p50_ms']:+.1f} ms"
            lines.append(
                f"serving {name}: stream tok/s x{st['out_tok_per_s']:.3f}, json x{modes['json']['out_tok_per_s']:.3f}, "
                f"added TTFT p50 {ttft}"
            )
        lines.extend(f"serving note: {n}" for n in s.get("notes", []))
    if lw := load_result("logwriter"):
        tp, ot = lw["throughput"], lw["outage"]
        lines.append(
            f"logwriter: {tp['per_s']:,.0f} completions/s; missing {tp['check']['missing']} of "
            f"{tp['check']['written']:,}; across a Redis SIGKILL+restart missing {ot['check']['missing']} of "
            f"{ot['check']['written']:,} ({ot['check']['duplicates']} duplicates)"
        )
    if sw := load_result("swap"):
        st = sw["streams"]
        lines.append(
            f"swap: idle p50 {sw['idle_swap_p50_s']:.3f}s max {sw['idle_swap_max_s']:.3f}s; under load p50 "
            f"{sw['loaded_swap_p50_s'] or float('nan'):.3f}s; {st['streams']} streams: {st['failed']} failed, "
            f"{st['mixed']} mixed, {st['mismatched']} mismatched"
        )
    if cl := load_result("closed_loop"):
        curve = " → ".join(
            f"{r['heldout_rate']:.0%}" + (f" (kept {r['content_kept']:.0%})" if "content_kept" in r else "")
            for r in cl["rounds"]
        )
        events = [r["feedback_events"] for r in cl["rounds"][1:]]
        lines.append(f"closed loop: held-out preferred {curve} (feedback/round {events}, {cl['total_s']:.0f}s)")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of the whole chain")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    args = p.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(BENCHES)
    if unknown:
        p.error(f"--skip {sorted(unknown)}: unknown; choose from {', '.join(BENCHES)}")

    t_all = time.monotonic()
    status: dict[str, str] = {}
    for name, (full, quick) in BENCHES.items():
        if name in skip:
            status[name] = "skipped"
            continue
        print(f"\n=== {name} ===", flush=True)
        t0 = time.monotonic()
        argv = [sys.executable, "-m", f"bench.{name}", *(quick if args.quick else full)]
        rc = subprocess.run(argv, cwd=ROOT).returncode
        status[name] = f"{'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.monotonic() - t0:.0f}s"
    subprocess.run([sys.executable, "-m", "bench.plot"], cwd=ROOT)

    print(f"\n=== summary ({time.monotonic() - t_all:.0f}s) ===")
    for name, st in status.items():
        print(f"{name}: {st}")
    for line in summary():
        print(line)
    return 1 if any(s.startswith("FAILED") for s in status.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
