"""serve/placement.py: the server's own processes leave the cores vLLM bound its workers to, and only those."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from serve.placement import free_cpus, keep_off_workers, worker_free_cpus

# A stand-in for the server's tree: a main process with a second thread, a "worker" (titled as vLLM titles them,
# bound as it binds them, or not) and an "engine core" (any other child).
TREE = """
import os, subprocess, sys, threading, time
bind = sys.argv[1] == "bind"
worker = subprocess.Popen(["bash", "-c", "exec -a VLLM::Worker_TP0 sleep 600"])
if bind:
    os.sched_setaffinity(worker.pid, {0})
core = subprocess.Popen(["sleep", "600"])
while not open(f"/proc/{worker.pid}/cmdline").read().startswith("VLLM::Worker"):  # until bash has exec'd
    time.sleep(0.01)
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print(worker.pid, core.pid, flush=True)
time.sleep(600)
"""


def test_free_cpus_are_the_ones_no_bound_worker_holds() -> None:
    assert free_cpus({0, 1, 2, 3}, [{0, 1}]) == {2, 3}
    assert free_cpus({0, 1, 2, 3}, [{0}, {1}]) == {2, 3}  # two workers (tensor parallel)
    assert free_cpus({0, 1}, [{0, 1}]) is None  # not bound: nothing to keep off
    assert free_cpus({0, 1}, []) is None  # no worker (a GPU engine's workers are unbound too)
    assert free_cpus({0, 1}, [{0}, {1}]) is None  # the workers hold every CPU: stay where the kernel puts us
    assert free_cpus({0, 1, 2, 3}, [{0}, {0, 1, 2, 3}]) is None  # one worker unbound: it may run anywhere


@contextmanager
def _tree(bind: bool) -> Iterator[tuple[psutil.Process, psutil.Process, psutil.Process]]:
    root = subprocess.Popen(
        [sys.executable, "-c", TREE, "bind" if bind else "free"], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert root.stdout is not None
        worker, core = (psutil.Process(int(p)) for p in root.stdout.readline().split())
        yield psutil.Process(root.pid), worker, core
    finally:
        os.killpg(root.pid, signal.SIGKILL)
        root.wait()


def _masks(proc: psutil.Process) -> list[set[int]]:
    return [os.sched_getaffinity(t.id) for t in proc.threads()]


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to keep one free")


@needs_two_cpus
def test_every_thread_and_non_worker_child_moves_off_a_bound_worker() -> None:
    everything = os.sched_getaffinity(0)
    with _tree(bind=True) as (root, worker, core):
        assert worker_free_cpus(root.pid) == everything - {0}
        assert keep_off_workers(root.pid) == everything - {0}
        assert len(root.threads()) >= 2
        assert _masks(root) == [everything - {0}] * len(root.threads())  # every thread, not only the main one
        assert _masks(core) == [everything - {0}]
        assert _masks(worker) == [{0}]  # the worker keeps its binding


@needs_two_cpus
def test_nothing_moves_when_no_worker_is_bound() -> None:
    everything = os.sched_getaffinity(0)
    with _tree(bind=False) as (root, worker, core):
        assert keep_off_workers(root.pid) is None
        assert _masks(root) == [everything] * len(root.threads())
        assert _masks(core) == [everything]
        assert _masks(worker) == [everything]
