"""Shared plumbing of the benchmarks in bench/: servers as subprocesses, percentiles, result files.

Not runnable on its own. Each bench script puts the repository root and bench/ on sys.path and imports this.
Servers are started exactly as users start them (`python -m core.cli serve`, `python -m
vllm.entrypoints.openai.api_server`), one process group each, so stopping one stops its engine workers too.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "var" / "models" / "demo"
PYTHON = sys.executable

# Engine settings shared by every server under test: the values ServeSettings uses by default,
# so vLLM's own server runs the very engine configuration secondstage runs in-process.
ENGINE = {
    "max_model_len": 1024,
    "gpu_memory_utilization": 0.2,
    "max_num_seqs": 64,
    "max_lora_rank": 16,
    "max_loras": 2,
    "dtype": "float32",
    "seed": 0,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """A directory under /tmp: redis unix-socket paths must stay under ~100 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ensure_demo_model() -> Path:
    from serve.demo.build import ensure_demo_model as build

    return Path(build(DEMO))


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank-with-interpolation percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def machine() -> dict[str, Any]:
    """What the figures were measured on (the load average says how noisy it was)."""
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "mem_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"bench": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@dataclass
class ServerProcess:
    """A server subprocess in its own process group, with its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    log: Path
    health_path: str = "/health"
    api_key: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 300.0) -> float:
        """Start and wait until the health route answers 200; returns the seconds it took."""
        t0 = time.monotonic()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log}:\n{self.tail()}")
            try:
                if httpx.get(self.url + self.health_path, headers=self.headers, timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} not healthy within {timeout}s; log {self.log}:\n{self.tail()}")
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Engine workers live in the same group; make sure none outlives its server.
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def secondstage_server(
    *, redis_url: str, var_dir: Path, log: Path, model: Path = DEMO, extra_env: dict[str, str] | None = None
) -> ServerProcess:
    port = free_port()
    env = {
        **os.environ,
        "SECONDSTAGE_VAR_DIR": str(var_dir),
        "SECONDSTAGE_MODEL": str(model),
        "SECONDSTAGE_SERVED_MODEL_NAME": "demo",
        "SECONDSTAGE_REDIS_URL": redis_url,
        "SECONDSTAGE_PORT": str(port),
        "SECONDSTAGE_POLICIES_DIR": str(ROOT / "policies"),
        "SECONDSTAGE_MAX_MODEL_LEN": str(ENGINE["max_model_len"]),
        "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": str(ENGINE["gpu_memory_utilization"]),
        "SECONDSTAGE_MAX_NUM_SEQS": str(ENGINE["max_num_seqs"]),
        "SECONDSTAGE_MAX_LORA_RANK": str(ENGINE["max_lora_rank"]),
        "SECONDSTAGE_MAX_LORAS": str(ENGINE["max_loras"]),
        "SECONDSTAGE_SEED": str(ENGINE["seed"]),
        "TOKENIZERS_PARALLELISM": "false",
        **(extra_env or {}),
    }
    argv = [PYTHON, "-m", "core.cli", "serve", "--log-level", "warning"]
    return ServerProcess("secondstage", argv, env, port, log)


def vllm_server(*, log: Path, model: Path = DEMO) -> ServerProcess:
    port = free_port()
    argv = [
        PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", "demo",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(ENGINE["max_model_len"]),
        "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
        "--max-num-seqs", str(ENGINE["max_num_seqs"]),
        "--enable-lora",
        "--max-lora-rank", str(ENGINE["max_lora_rank"]),
        "--max-loras", str(ENGINE["max_loras"]),
        "--dtype", str(ENGINE["dtype"]),
        "--seed", str(ENGINE["seed"]),
        "--enforce-eager",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return ServerProcess("vllm", argv, env, port, log)


@contextmanager
def running(server: ServerProcess, timeout: float = 300.0) -> Iterator[ServerProcess]:
    server.start(timeout)
    try:
        yield server
    finally:
        server.stop()
