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
            [100 * r.get("content_kept", r["compliance"].get("target_exact", 0)) for r in loop["rounds"]],
            "^:",
            label="base content kept",
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
