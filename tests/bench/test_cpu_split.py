"""Where a benchmark request's CPU goes: vLLM's engine processes are told apart from the frontend by their titles,
and the serving table adds them up per request."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.harness import cpu_by_process, cpu_seconds
from bench.serving import Cell, analyse, cpu_rows

BURN = (
    "import setproctitle, time\n"
    "setproctitle.setproctitle({title!r})\n"
    "end = time.process_time() + 0.4\n"
    "while time.process_time() < end: pass\n"
    "print('done', flush=True)\n"
    "time.sleep(30)\n"
)


def _burning_child(title: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", BURN.format(title=title)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "done"
    return child


def test_engine_processes_are_counted_apart_from_the_frontend() -> None:
    before = cpu_by_process(os.getpid())
    children = [_burning_child("VLLM::EngineCore_DP0"), _burning_child("VLLM::Worker_TP0")]
    try:
        after = cpu_by_process(os.getpid())
        assert after["engine_core"] - before["engine_core"] >= 0.3
        assert after["engine_worker"] - before["engine_worker"] >= 0.3
        # This process did not burn: the children's CPU is not put on the frontend (nor counted twice).
        assert after["frontend"] - before["frontend"] < 0.3
        assert abs(cpu_seconds(os.getpid()) - sum(after.values())) < 0.1
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_cpu_rows_sum_the_roles_at_16_and_64_clients() -> None:
    cells = [Cell(1, 64, "short", True, 8), Cell(16, 64, "short", True, 48)]
    per_pass = {
        "out_tok_per_s": 1000.0,
        "req_per_s": 15.0,
        "ttft_p50_ms": 10.0,
        "errors": 0,
        "cpu_ms_frontend": 7.0,
        "cpu_ms_engine_core": 20.0,
        "cpu_ms_engine_worker": 30.0,
        "cpu_ms_redis": 0.5,
        "cpu_ms_load_generator": 5.0,
    }
    runs = {
        "c": [{c.name: dict(per_pass) for c in cells}, {c.name: dict(per_pass, cpu_ms_frontend=9.0) for c in cells}]
    }
    rows = cpu_rows(cells, analyse(cells, runs))
    assert [(cell, server) for cell, server, _, _ in rows] == [("c16-o64-short-stream", "c")]
    _, _, ms, total = rows[0]
    assert ms == [8.0, 20.0, 30.0, 0.5, 5.0]  # the frontend's median over the two passes
    assert total == 63.5
