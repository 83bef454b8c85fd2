"""Where the server's own processes run beside a CPU engine: off the cores vLLM bound its workers to.

vLLM's CPU backend binds each worker's OpenMP threads to a set of cores and keeps `reserve_cpu_num` cores (one
per worker on x86) out of those sets for "the scheduler process" (vllm/utils/ompmultiprocessing.py), yet binds
nothing else: the API process, vLLM's engine-core process and what they spawn (the private redis-server) may run
on a worker's cores, and the kernel puts them there whenever the reserved cores are busy, preempting a forward
pass that every running sequence waits for. Measured here (2 vCPUs, the worker bound to one; secondstage full,
64 clients × 64 tokens streamed, one warm server, 4 alternating rounds; docs/performance.md): keeping the API and
engine-core processes on the other core raised throughput 9-19% in every round, and the engine core's CPU per
request fell by about a quarter (it spins less when it is not fighting the worker for its core).

So, when `keep_off_worker_cpus` is set (opt-in: its description says why), once the engine has started the
server moves every thread of its own process and of each non-worker descendant onto the CPUs no worker is bound
to; threads and processes started later inherit that. Nothing moves when there is no worker below this process
or one is not bound (a GPU engine, `VLLM_CPU_OMP_THREADS_BIND=nobind`) or when the workers hold every CPU.
psutil (a vLLM dependency) walks the process tree; the kernel call is the stdlib's.
"""

from __future__ import annotations

import logging
import os

import psutil

logger = logging.getLogger("secondstage.placement")

WORKER_TITLE = "VLLM::Worker"
"""The process title vLLM gives its workers (`VLLM::Worker`, `VLLM::Worker_TP1`, ...)."""


def free_cpus(allowed: set[int], workers: list[set[int]]) -> set[int] | None:
    """The CPUs of `allowed` outside every worker's CPUs; None when there is no worker or nothing would be left
    (an unbound worker may run anywhere)."""
    rest = allowed - set().union(*workers)
    return rest if workers and rest else None


def _title(proc: psutil.Process) -> str:
    cmdline = proc.cmdline()
    return cmdline[0] if cmdline else proc.name()


def _tree(root: psutil.Process) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """`root` and its descendants split into (workers and what they started, the rest)."""
    workers: list[psutil.Process] = []
    rest = [root]
    for proc in root.children(recursive=True):
        try:
            titles = [_title(p) for p in (proc, *proc.parents())]
        except psutil.Error:  # gone since the listing
            continue
        (workers if any(t.startswith(WORKER_TITLE) for t in titles) else rest).append(proc)
    return workers, rest


def _plan(root: psutil.Process) -> tuple[set[int] | None, list[psutil.Process]]:
    """The CPUs `root`'s vLLM workers leave free (None as in `free_cpus`) and the processes to move there."""
    workers, rest = _tree(root)
    bindings = []
    for worker in workers:
        try:
            bindings.append(set(worker.cpu_affinity()))
        except psutil.Error:
            continue
    return free_cpus(set(root.cpu_affinity()), bindings), rest


def worker_free_cpus(pid: int | None = None) -> set[int] | None:
    """The CPUs process `pid` (default: this one) may use that none of its vLLM workers is bound to; None as in
    `free_cpus`. The benchmarks keep their load generator there too."""
    return _plan(psutil.Process(pid))[0]


def keep_off_workers(pid: int | None = None) -> set[int] | None:
    """Move every thread of process `pid` (default: this one) and of its non-worker descendants onto the CPUs no
    vLLM worker below it is bound to. Returns those CPUs, or None when nothing moved (see `free_cpus`)."""
    cpus, rest = _plan(psutil.Process(pid))
    if cpus is None:
        return None
    for proc in rest:
        try:
            threads = [t.id for t in proc.threads()]
        except psutil.Error:
            continue
        for tid in threads:
            # Per thread: sched_setaffinity on a pid moves only that process' main thread.
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # a thread that ended since the listing
                continue
    logger.info("kept the API and engine-core processes on CPUs %s, off the engine workers'", sorted(cpus))
    return cpus
