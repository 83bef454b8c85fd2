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

CLOSED_LOOP_PREFERENCE = "sign-off"
"""The preference issue 9's goal is measured on (a suffix the demo model can learn without losing its content: the
house style's prefix it cannot, so the gate refuses those rounds)."""
CLOSED_LOOP_RESULT = f"closed_loop_{CLOSED_LOOP_PREFERENCE}"
"""bench/closed_loop.py names its file after a preference other than the house style's: the summary reads this
run's figures, not an older house-style run's."""

BENCHES: dict[str, tuple[list[str], list[str]]] = {
    # name: (full arguments, --quick arguments)
    "policy_bench": ([], ["--quick"]),
    "logwriter": ([], ["--quick"]),
    # Quick: secondstage full only (bare runs the same code with two flags off), one pass.
    "serving": ([], ["--quick", "--passes", "1", "--only", "rac"]),
    "swap": ([], ["--versions", "2", "--idle-swaps", "3", "--swaps", "4", "--clients", "16"]),
    # At the goal's 200 events; three rounds keep `make bench` near 30 minutes (docs/performance.md: five rounds).
    "closed_loop": (
        ["--preference", CLOSED_LOOP_PREFERENCE, "--train", "200", "--rounds", "3"],
        ["--preference", CLOSED_LOOP_PREFERENCE, "--rounds", "1", "--train", "16", "--heldout", "12"],
    ),
    "align_scale": ([], ["--quick"]),
    "api_cost": ([], ["--quick"]),
}


def summary() -> list[str]:
    lines = []
    if (s := load_result("serving")) and s.get("table"):
        for name, row in s["table"].items():
            parts = []
            for key in ("c/r", "c/a", "b/r", "a/r"):
                if r := row["ratios"].get(key):
                    parts.append(f"{key} x{r['median']:.2f} ({r['verdict']})")
            if (r := row["ratios"].get("c/r")) and r["added_ttft_p50_ms"] is not None:
                parts.append(f"c TTFT p50 {r['added_ttft_p50_ms']:+.1f} ms")
            lines.append(f"serving {name}: " + ", ".join(parts))
        lines.extend(f"serving: {name} failed: {e[0][:200]}" for name, e in s.get("errors", {}).items() if e)
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
            f"{sw['loaded_swap_p50_s'] or float('nan'):.3f}s; server-side switch under load p50 "
            f"{sw.get('loaded_server_switch_p50_s') or float('nan'):.3f}s max "
            f"{sw.get('loaded_server_switch_max_s') or float('nan'):.3f}s; {st['streams']} streams: "
            f"{st['failed']} failed, {st['mixed']} mixed, {st['mismatched']} mismatched"
        )
    if cl := load_result(CLOSED_LOOP_RESULT):
        curve = " → ".join(
            f"{r['heldout_rate']:.0%}" + (f" (kept {r['content_kept']:.0%})" if "content_kept" in r else "")
            for r in cl["rounds"]
        )
        events = [r["feedback_events"] for r in cl["rounds"][1:]]
        lines.append(f"closed loop: held-out preferred {curve} (feedback/round {events}, {cl['total_s']:.0f}s)")
    if (pb := load_result("policy_bench")) and pb.get("sizes"):
        sizes = sorted((int(n), e) for n, e in pb["sizes"].items() if int(n) > 0)
        lines.append(
            "policies: µs/chunk "
            + ", ".join(f"{n} rules {e['us_per_chunk']:.1f}" for n, e in sizes)
            + f"; input 4k chars at {sizes[-1][0]} rules {sizes[-1][1]['input_4k_ms']:.2f} ms"
        )
    if (al := load_result("align_scale")) and al.get("build"):
        lines.append(
            "align: dataset build "
            + ", ".join(f"{n} events {e['seconds']:.2f}s/{e['peak_mib']:.1f} MiB" for n, e in al["build"].items())
            + "; runs "
            + ", ".join(f"{n}: {r['outcome']} {r['wall_s']}s" for n, r in al["runs"].items())
        )
    if (ac := load_result("api_cost")) and ac.get("configs"):
        for config, result in ac["configs"].items():
            d = result["derived"]
            parts = [f"{k.replace('_us_per_', ' µs/')} {v:,.1f}" for k, v in d.items() if v is not None]
            lines.append(f"api cost {config}: " + ", ".join(parts))
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
