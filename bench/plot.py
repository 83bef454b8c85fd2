"""The benchmark figures as pictures: one PNG per benchmark, bench/results/<name>.png from <name>.json.

    .venv/bin/python -m bench.plot [NAME ...]     # default: every benchmark that has a JSON

Needs matplotlib (`.venv/bin/pip install matplotlib`); without it, says so and exits 0 (the JSON is the record).
A benchmark without a JSON is skipped; one whose JSON lacks what its plot needs is reported and skipped, so a
changed result format never stops the others. Every picture is titled with the load average it was measured
under: the machine is shared and the figures move with it. To add a benchmark, add a function to `PLOTS`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.results import RESULTS, load_result


def _load_note(data: dict[str, Any]) -> str:
    m = data.get("machine") or {}
    return f"{data.get('finished', '?')[:16]}, {m.get('cpus', '?')} CPUs, load avg {m.get('loadavg_1m', 0):.1f} at end"


def plot_serving(data: dict[str, Any], plt: Any) -> Any:
    """Ratios to the raw engine (left) and to vLLM's server (middle) per cell, TTFT p50 added (right)."""
    table = data["table"]
    names = [c["name"] for c in data["cells"]]
    fig, axes = plt.subplots(1, 3, figsize=(20, 0.34 * len(names) + 2.5), sharey=True)
    ys = list(range(len(names)))
    series = {
        "vs raw engine": [("a/r", "vLLM server"), ("b/r", "secondstage bare"), ("c/r", "secondstage full")],
        "vs vLLM's server": [("b/a", "secondstage bare"), ("c/a", "secondstage full")],
    }
    colours = {"vLLM server": "tab:grey", "secondstage bare": "tab:blue", "secondstage full": "tab:orange"}
    for ax, (title, pairs) in zip(axes[:2], series.items(), strict=True):
        h = 0.8 / len(pairs)
        for i, (key, label) in enumerate(pairs):
            med, lo, hi, pos = [], [], [], []
            for y, name in zip(ys, names, strict=True):
                r = table[name]["ratios"].get(key)
                if r is None:
                    continue
                pos.append(y + (i - (len(pairs) - 1) / 2) * h)
                med.append(r["median"])
                lo.append(r["median"] - r["min"])
                hi.append(r["max"] - r["median"])
            ax.barh(pos, med, h, xerr=[lo, hi], label=label, color=colours[label], capsize=2)
        ax.axvline(1.0, color="black", lw=0.8)
        if title == "vs raw engine":
            ax.axvline(0.85, color="red", lw=0.8, ls=":", label="goal 0.85")
        ax.set(title=f"throughput {title} (median, bars: min-max of passes)", xlabel="ratio")
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    h = 0.8 / 3
    for i, (key, label) in enumerate(
        [("a/r", "vLLM server"), ("b/r", "secondstage bare"), ("c/r", "secondstage full")]
    ):
        pos, vals = [], []
        for y, name in zip(ys, names, strict=True):
            r = table[name]["ratios"].get(key)
            if r is not None and r["added_ttft_p50_ms"] is not None:
                pos.append(y + (i - 1) * h)
                vals.append(r["added_ttft_p50_ms"])
        ax.barh(pos, vals, h, label=label, color=colours[label])
    ax.axvline(5.0, color="red", lw=0.8, ls=":", label="goal +5 ms")
    ax.set_xscale("symlog", linthresh=10)  # a few ms and several seconds in one panel
    ax.set(title="TTFT p50 added over the raw engine (streamed cells)", xlabel="ms (symlog)")
    ax.legend(fontsize=7, loc="lower right")
    axes[0].set_yticks(ys, names, fontsize=7)
    axes[0].invert_yaxis()
    passes = data.get("params", {}).get("passes", "?")
    fig.suptitle(f"Serving sweep, {passes} alternating passes — {_load_note(data)}", fontsize=10)
    return fig


def plot_swap(data: dict[str, Any], plt: Any) -> Any:
    """Per swap: server-side switch time and first response by the new version, idle and under load."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    idle = [s["switch_s"] for s in data.get("idle_server_switch", [])]
    loaded = [s["switch_s"] for s in data.get("loaded_server_switch", [])]
    ax.plot(range(1, len(idle) + 1), idle, "o-", label="idle: server switched")
    ax.plot(range(1, len(data["idle_swap_s"]) + 1), data["idle_swap_s"], "o:", label="idle: first response")
    ax.plot(range(1, len(loaded) + 1), loaded, "s-", label="under load: server switched")
    ax.plot(
        range(1, len(data["loaded_swap_s"]) + 1),
        [x if x is not None else float("nan") for x in data["loaded_swap_s"]],
        "s:",
        label="under load: first probe response",
    )
    ax.axhline(1.0, color="red", lw=0.8, ls=":", label="goal 1 s")
    ax.xaxis.get_major_locator().set_params(integer=True)
    st = data["streams"]
    clients = data.get("params", {}).get("clients", "?")
    ax.set(
        title=f"Hot-swap, {clients} streams: {st['streams']} streams, {st['failed']} failed, {st['mixed']} mixed, "
        f"{st['mismatched']} mismatched\n{_load_note(data)}",
        xlabel="swap #",
        ylabel="seconds after activate()",
    )
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return fig


def plot_closed_loop(data: dict[str, Any], plt: Any) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rounds = [r["round"] for r in data["rounds"]]
    ax.plot(rounds, [100 * r["heldout_rate"] for r in data["rounds"]], "o-", label="held-out preferred")
    ax.plot(rounds, [100 * (r["compliance"]["rate"] or 0) for r in data["rounds"]], "s--", label="policy compliance")
    ax.plot(
        rounds,
        [100 * r.get("content_kept", r["compliance"].get("target_exact", 0)) for r in data["rounds"]],
        "^:",
        label="base content kept",
    )
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    for r in data["rounds"][1:]:
        ax.annotate(f"{r['feedback_events']} fb", (r["round"], 100 * r["heldout_rate"]), fontsize=8)
    ax.set_xticks(rounds)
    ax.legend(loc="lower right", fontsize=8)
    ax.set(title=f"Closed loop (demo model) — {_load_note(data)}", xlabel="align round (0 = base)", ylabel="%")
    ax.title.set_fontsize(9)
    ax.set_ylim(-5, 105)
    return fig


def plot_policy_bench(data: dict[str, Any], plt: Any) -> Any:
    """bench/results/policy_bench.json → cost per chunk, input check and compile time against the number of rules."""
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
    return fig


def plot_logwriter(data: dict[str, Any], plt: Any) -> Any:
    """bench/results/logwriter.json → completions/s of each writer variant, every pass shown."""
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
    return fig


def plot_align_scale(data: dict[str, Any], plt: Any) -> Any:
    """bench/results/align_scale.json → dataset build time and memory, and whole align runs, against events."""
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
    return fig


def plot_api_cost(data: dict[str, Any], plt: Any) -> Any:
    """bench/results/api_cost.json → the API process' CPU µs per request, by cell, full beside bare."""
    fig, ax = plt.subplots(figsize=(8, 4.2))
    configs = list(data["configs"])
    cells = list(data["configs"][configs[0]]["cells"])
    width = 0.8 / len(configs)
    for k, config in enumerate(configs):
        result = data["configs"][config]
        xs = [i + (k - (len(configs) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [result["cells"][c]["api_us_per_request"] for c in cells], width, label=config)
    ax.set_xticks(range(len(cells)), cells)
    ax.set(ylabel="API process CPU µs per request")
    derived = ", ".join(
        f"{config}: {data['configs'][config]['derived']['stream_us_per_chunk'] or float('nan'):.1f} µs/chunk"
        for config in configs
    )
    args = data["args"]
    ax.set_title(
        f"API cost, instant engine, {args['clients']} clients ({derived}; load avg {data['loadavg_after']:.1f})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    return fig


PLOTS: dict[str, Callable[[dict[str, Any], Any], Any]] = {
    "serving": plot_serving,
    "swap": plot_swap,
    "closed_loop": plot_closed_loop,
    "logwriter": plot_logwriter,
    "policy_bench": plot_policy_bench,
    "align_scale": plot_align_scale,
    "api_cost": plot_api_cost,
}


def plot(names: list[str] | None = None, out_dir: Path = RESULTS) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (install it with .venv/bin/pip install matplotlib)")
        return []
    written = []
    for name in names or list(PLOTS):
        data = load_result(name)
        if data is None:
            print(f"{name}: no {name}.json, nothing to plot")
            continue
        try:
            fig = PLOTS[name](data, plt)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            # The JSON is the record; a plot that no longer fits its format must not hide the others.
            print(f"{name}: could not plot ({type(exc).__name__}: {exc})")
            continue
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        print(f"wrote {path}")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to plot, of {', '.join(PLOTS)} (default: all)")
    names = parser.parse_args().names
    if unknown := set(names) - set(PLOTS):
        parser.error(f"{sorted(unknown)}: no such plot; choose from {', '.join(PLOTS)}")
    plot(names or None)


if __name__ == "__main__":
    main()
