"""One real secondstage server for the whole session: real vLLM on the demo model, real redis-server.

The server runs as a subprocess (`python -m core.cli serve`) exactly as users run it,
with its Redis started here so tests can kill and restart Redis under it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.harness import ROOT, ensure_demo_model, log_tail, running, secondstage_server
from core.redis_server import PrivateRedis
from tests.e2e.reference import reference  # noqa: F401  (vLLM's own server, for the fidelity tests)


@dataclass
class Server:
    url: str
    env: dict[str, str]
    redis: PrivateRedis
    var_dir: Path
    log: Path
    policies: Path

    def cli(
        self, *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `secondstage ARGS` against this server's Redis and var/ (as an operator would); `env` adds to
        the server's environment."""
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log, n)


@pytest.fixture(scope="session")
def demo_model() -> Path:
    return ensure_demo_model()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("e2e")
    # fsync always: the outage test SIGKILLs it and counts on acknowledged writes surviving.
    redis = PrivateRedis(base / "redis", appendfsync="always")
    redis.start()
    # A copy of the shipped rules, so a test can edit them under the running server.
    policies = base / "policies"
    shutil.copytree(ROOT / "policies", policies)
    process = secondstage_server(
        redis_url=redis.url,
        var_dir=base / "var",
        log=base / "server.log",
        model=demo_model,
        policies=policies,
        engine=None,  # the server's own defaults
        log_level="info",
        # align's versions are activated for everyone at once here; the canary path has its own servers
        # (test_canary.py).
        extra_env={"SECONDSTAGE_RECONCILE_INTERVAL_S": "1", "SECONDSTAGE_CANARY_ENABLED": "false"},
    )
    srv = Server(process.url, process.env, redis, base / "var", process.log, policies)
    try:
        with running(process):
            yield srv
    finally:
        redis.stop()


@pytest.fixture
def openai_client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="test-key", max_retries=0, timeout=120)
