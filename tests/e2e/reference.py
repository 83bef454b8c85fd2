"""vLLM's own OpenAI server on the demo model: the reference the fidelity tests compare us with.

A session fixture, `reference`, registered in tests/e2e/conftest.py. It starts vLLM's server through
the harness the benchmarks use (bench/harness.py) with the same context length as our server, once
per session, and only when a test asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.harness import Engine, log_tail, running, vllm_server
from serve.engine import CPU_BLOCK_SIZE


@dataclass
class Reference:
    url: str
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log, n)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Reference]:
    base = tmp_path_factory.mktemp("vllm-reference")
    # vLLM's defaults for everything else (no LoRA): the fidelity tests compare the base model's answers. The KV
    # block size is ours (serve.engine.CPU_BLOCK_SIZE): the same engine, so any difference is the API's.
    engine = Engine(max_model_len=1024, block_size=CPU_BLOCK_SIZE)
    process = vllm_server(log=base / "vllm.log", model=demo_model, engine=engine)
    with running(process):
        yield Reference(process.url, process.log)
