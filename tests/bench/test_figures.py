"""The benchmarks' arithmetic: pass-by-pass ratios and their noise verdicts, the sweep's shape, swap matching.

No server runs here: these are the pure functions that turn samples into the figures README quotes.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.serving import Cell, analyse, ratio, sweep
from bench.swap import match_switches, reload_phases, server_switches


def _runs(**rates: list[float]) -> dict[str, list[dict[str, object] | None]]:
    cell = "c16-o64-short-stream"
    return {
        name: [
            {cell: {"out_tok_per_s": r, "req_per_s": r / 64, "ttft_p50_ms": 10.0 + i, "errors": 0}}
            for i, r in enumerate(rs)
        ]
        for name, rs in rates.items()
    }


CELL = Cell(16, 64, "short", True, 48)


def test_ratio_is_taken_pass_by_pass() -> None:
    # Pass 2 was slow for both servers: per-pass ratios stay at 0.9 where ratios of means would not.
    r = ratio(CELL, _runs(c=[900.0, 450.0, 900.0], r=[1000.0, 500.0, 1000.0]), "c", "r")
    assert r is not None
    assert [round(x, 3) for x in r["passes"]] == [0.9, 0.9, 0.9]
    assert r["verdict"] == "slower"


def test_passes_on_both_sides_of_one_are_inside_the_noise() -> None:
    r = ratio(CELL, _runs(c=[1100.0, 900.0, 1000.0], a=[1000.0, 1000.0, 1000.0]), "c", "a")
    assert r is not None and r["verdict"] == "inside the noise"
    faster = ratio(CELL, _runs(c=[1100.0, 1050.0, 1200.0], a=[1000.0, 1000.0, 1000.0]), "c", "a")
    assert faster is not None and faster["verdict"] == "faster"


def test_a_failed_pass_is_left_out_of_the_pairs() -> None:
    runs = _runs(c=[900.0, 900.0, 900.0], r=[1000.0, 1000.0, 1000.0])
    runs["c"][1] = None
    r = ratio(CELL, runs, "c", "r")
    assert r is not None and len(r["passes"]) == 2


def test_one_pass_gives_no_noise_verdict() -> None:
    r = ratio(CELL, _runs(c=[900.0], r=[1000.0]), "c", "r")
    assert r is not None and r["verdict"] == "one pass: no noise estimate"


def test_added_ttft_is_the_median_difference() -> None:
    row = analyse([CELL], _runs(c=[1.0, 1.0, 1.0], r=[1.0, 1.0, 1.0]))[CELL.name]
    assert row["ratios"]["c/r"]["added_ttft_p50_ms"] == 0.0
    assert row["servers"]["c"]["out_tok_per_s_spread"] == 0.0


def test_sweep_covers_the_issue_axes_and_fits_the_context() -> None:
    cells = sweep()
    assert {c.concurrency for c in cells} == {1, 16, 64, 256}
    assert {c.max_tokens for c in cells} == {1, 64, 512}
    assert {c.prompt for c in cells} == {"short", "long"}
    assert any(c.lora for c in cells)
    for c in cells:
        assert c.requests >= c.concurrency, c.name  # every client sends at least one request
        assert not (c.prompt == "long" and c.max_tokens == 512), c.name  # would exceed 1,024 tokens
    names = [c.name for c in cells]
    assert len(names) == len(set(names))
    assert {(c.name.replace("-stream", "").replace("-json", "")) for c in cells if c.stream} == {
        c.name.replace("-stream", "").replace("-json", "") for c in cells if not c.stream and c.max_tokens > 1
    } | {"c64-o1-short"}
    grid = sweep(grid=True)
    assert {c.name for c in grid} > set(names)
    assert len(sweep(quick=True)) < len(cells)


def test_swap_switch_is_matched_to_its_own_activation(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    log.write_text(
        '{"time": "2026-01-01T00:00:01.100+00:00", "logger": "secondstage.engine", '
        '"message": "now serving version v1 (was base; loaded in 0.050s)"}\n'
        "not json\n"
        '{"time": "2026-01-01T00:00:03.400+00:00", "logger": "secondstage.engine", '
        '"message": "now serving version base (was v1; loaded in 0.000s)"}\n'
    )
    switches = server_switches(log)
    t0 = switches[0][0] - 0.1
    matched = match_switches([(t0, "v1"), (t0 + 2.0, "base"), (t0 + 4.0, "v2")], switches)
    assert [round(m["switch_s"], 3) if m["switch_s"] is not None else None for m in matched] == [0.1, 0.4, None]
    assert matched[0]["load_s"] == 0.05


def test_merged_reload_phases_are_read_from_the_json_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    line = {"time": "2026-11-30T10:00:00.000+00:00", "logger": "secondstage.engine",
            "message": "weights of v2 loaded (merge 0.001s, drain 0.250s, reload 0.071s)"}  # fmt: skip
    log.write_text("not json\n" + json.dumps(line) + "\n" + json.dumps({**line, "message": "other"}) + "\n")
    assert reload_phases(log) == [{"version": "v2", "merge_s": 0.001, "drain_s": 0.25, "reload_s": 0.071}]
