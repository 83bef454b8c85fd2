"""The benchmark figures as one PNG: the closed-loop curve and the serving-overhead comparison.

    .venv/bin/python -m bench.plot [OUT]     # bench/results/{closed_loop,serving}.json → bench/results/bench.png

Needs matplotlib (`.venv/bin/pip install matplotlib`); without it, says so and exits 0 (the JSON is the record).
A panel whose JSON is missing is drawn empty with a note.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.results import RESULTS, load_result


def plot(out: Path = RESULTS / "bench.png") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (install it with .venv/bin/pip install matplotlib)")
        return None

    fig, (loop_ax, serve_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    loop = load_result("closed_loop")
    if loop:
        rounds = [r["round"] for r in loop["rounds"]]
        loop_ax.plot(rounds, [100 * r["heldout_rate"] for r in loop["rounds"]], "o-", label="held-out preferred")
        loop_ax.plot(
            rounds,
            [100 * (r["compliance"]["rate"] or 0) for r in loop["rounds"]],
            "s--",
            label="policy compliance",
        )
        loop_ax.plot(
            rounds,
            [100 * r["compliance"].get("target_exact", 0) for r in loop["rounds"]],
            "^:",
            label="= corrected base answer",
        )
        loop_ax.axhline(90, color="grey", lw=0.8, ls=":")
        for r in loop["rounds"][1:]:
            loop_ax.annotate(f"{r['feedback_events']} fb", (r["round"], 100 * r["heldout_rate"]), fontsize=8)
        loop_ax.set_xticks(rounds)
        loop_ax.legend(loc="lower right", fontsize=8)
    else:
        loop_ax.text(0.5, 0.5, "no closed_loop.json", ha="center", transform=loop_ax.transAxes)
    loop_ax.set(title="Closed loop (demo model)", xlabel="align round (0 = base)", ylabel="%", ylim=(-5, 105))

    serving = load_result("serving")
    if serving:
        names = [n for n, r in serving["results"].items() if "error" not in r]
        labels = [f"{n}\n{serving['labels'][n]}" for n in names]
        width = 0.38
        xs = range(len(names))
        for i, mode in enumerate(("stream", "json")):
            ref = serving["results"].get("a", {}).get(mode, {}).get("out_tok_per_s")
            vals = [serving["results"][n][mode]["out_tok_per_s"] / ref if ref else 0 for n in names]
            serve_ax.bar([x + (i - 0.5) * width for x in xs], vals, width, label=mode)
        serve_ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        serve_ax.set_xticks(list(xs), labels, fontsize=8)
        serve_ax.legend(fontsize=8)
    else:
        serve_ax.text(0.5, 0.5, "no serving.json", ha="center", transform=serve_ax.transAxes)
    serve_ax.set(title="Output tokens/s relative to vLLM's server (a)", ylabel="ratio to a")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=RESULTS / "bench.png", help="the PNG to write")
    plot(parser.parse_args().out)


if __name__ == "__main__":
    main()


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (install it with .venv/bin/pip install matplotlib)")
        return None
    return plt


def plot_policy(out: Path = RESULTS / "policy_bench.png") -> Path | None:
    """bench/results/policy_bench.json → cost per chunk, input check and compile time against the number of rules."""
    plt = _pyplot()
    data = load_result("policy_bench")
    if plt is None or data is None:
        return None
    sizes = sorted((int(n), e) for n, e in data["sizes"].items() if int(n) > 0)
    ns = [n for n, _ in sizes]
    fig, (chunk_ax, input_ax, compile_ax) = plt.subplots(1, 3, figsize=(14, 4.2))
    chunk_ax.plot(ns, [e["us_per_chunk"] for _, e in sizes], "o-", label="long stream")
    chunk_ax.plot(ns, [e["us_per_chunk_in_64_token_responses"] for _, e in sizes], "s--", label="64-token responses")
    if (off := data["sizes"].get("0")) is not None:
        chunk_ax.axhline(off["us_per_chunk"], color="grey", lw=0.8, ls=":", label="no rules")
    chunk_ax.axhline(20, color="red", lw=0.8, ls=":", label="goal 20 µs")
    chunk_ax.set(title="Output filter", xlabel="rules", ylabel="µs per streamed chunk", xscale="log")
    chunk_ax.set_ylim(bottom=0)
    chunk_ax.legend(fontsize=8)
    input_ax.plot(ns, [e["input_4k_ms"] for _, e in sizes], "o-")
    input_ax.axhline(1.0, color="red", lw=0.8, ls=":", label="goal 1 ms")
    input_ax.set(title="Input check, 4,000 characters", xlabel="rules", ylabel="ms", xscale="log")
    input_ax.set_ylim(bottom=0)
    input_ax.legend(fontsize=8)
    compile_ax.plot(ns, [e["compile_s"] for _, e in sizes], "o-", label="compile (s)")
    stalls = [(n, e["reload"]) for n, e in sizes if e.get("reload")]
    if stalls:
        gap_ax = compile_ax.twinx()
        gap_ax.plot([n for n, _ in stalls], [r["max_gap_ms"] for _, r in stalls], "s--", color="C1")
        gap_ax.set_ylabel("event-loop max gap during reload (ms)", color="C1")
        gap_ax.set_ylim(bottom=0)
    compile_ax.set(title="Compile / reload", xlabel="rules", ylabel="s", xscale="log")
    fig.suptitle(f"Policies against the number of rules (load avg {data['machine']['loadavg_1m']:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def plot_logwriter(out: Path = RESULTS / "logwriter.png") -> Path | None:
    """bench/results/logwriter.json → completions/s of each writer variant, every pass shown."""
    plt = _pyplot()
    data = load_result("logwriter")
    if plt is None or data is None or not data.get("variants"):
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    names = list(data["variants"])
    for i, name in enumerate(names):
        v = data["variants"][name]
        ax.bar(i, v["per_s_median"], 0.6, label=None)
        ax.plot([i] * len(v["per_s_passes"]), v["per_s_passes"], "k.", ms=6)
    ax.axhline(20_000, color="red", lw=0.8, ls=":", label="goal 20k/s")
    ax.set_xticks(range(len(names)), names)
    ax.set(ylabel="completions/s (bar: median, dots: passes)")
    ax.set_title(
        f"Log writer, {data['params']['records']:,} records, AOF always (load avg {data['machine']['loadavg_1m']:.1f})",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out


def plot_align_scale(out: Path = RESULTS / "align_scale.png") -> Path | None:
    """bench/results/align_scale.json → dataset build time and memory, and whole align runs, against events."""
    plt = _pyplot()
    data = load_result("align_scale")
    if plt is None or data is None:
        return None
    fig, (build_ax, run_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    builds = sorted((int(n), e) for n, e in data["build"].items())
    ns = [n for n, _ in builds]
    build_ax.plot(ns, [e["seconds"] for _, e in builds], "o-", label="seconds")
    build_ax.set(title="Dataset build from Redis", xlabel="feedback events", ylabel="s", xscale="log", yscale="log")
    mem_ax = build_ax.twinx()
    mem_ax.plot(ns, [e["peak_mib"] for _, e in builds], "s--", color="C1")
    mem_ax.set_ylabel("peak Python heap (MiB)", color="C1")
    mem_ax.set_yscale("log")
    runs = sorted((int(n), e) for n, e in data["runs"].items())
    run_ax.plot(
        [n for n, _ in runs], [e["wall_s"] for _, e in runs], "o-", label=f"wall s (max_steps {data['max_steps']})"
    )
    rss_ax = run_ax.twinx()
    rss_ax.plot([n for n, _ in runs], [e["peak_rss_mib"] for _, e in runs], "s--", color="C1")
    rss_ax.set_ylabel("peak RSS (MiB)", color="C1")
    if goal := data.get("goal_run"):
        run_ax.plot([goal["events"]], [goal["wall_s"]], "r*", ms=12, label="default schedule")
        run_ax.axhline(120, color="red", lw=0.8, ls=":", label="goal 2 min")
    run_ax.set(title="secondstage align run", xlabel="feedback events", ylabel="s", xscale="log")
    run_ax.legend(fontsize=8)
    fig.suptitle(f"Align against feedback (load avg {data['machine']['loadavg_1m']:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return out
