"""serve's own private Redis, supervised: SIGKILL it under real traffic and see it come back.

A real `secondstage serve` (real vLLM on the demo model) run as `make serve` runs it: no
SECONDSTAGE_REDIS_URL, so serve starts and supervises its own `redis-server` child under var/redis.
The tests kill that child with SIGKILL while chat streams, kill it repeatedly, and make it unable to
come back (a corrupt AOF), and check what users, operators and `secondstage align run` see.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import IO

import httpx
import pytest
import redis

from bench.harness import ROOT, ServerProcess, free_port, log_tail, running
from core.keys import Keys
from core.redis_server import PrivateRedis

pytestmark = pytest.mark.slow

RESTART_DELAY_S = 1.0  # the first restart's wait: long enough for requests to land in the outage
MAX_DELAY_S = 8.0


@dataclass
class Serve:
    url: str
    env: dict[str, str]
    redis_dir: Path
    log: Path

    @property
    def redis(self) -> PrivateRedis:
        """A handle on the directory's server for probing only (it never starts one: tests do not call start)."""
        return PrivateRedis(self.redis_dir)

    def child_pid(self) -> int:
        return int((self.redis_dir / "redis.pid").read_text())

    def kill_child(self) -> int:
        pid = self.child_pid()
        os.kill(pid, signal.SIGKILL)
        return pid

    def health(self) -> dict:  # type: ignore[type-arg]
        return dict(httpx.get(self.url + "/health", timeout=10).json())

    def cli(self, *args: str, env: dict[str, str] | None = None, stderr: IO[str] | int = subprocess.PIPE) -> Popen[str]:
        """Start `secondstage ARGS` on serve's var/ (as an operator would, beside the running serve)."""
        return subprocess.Popen(
            [sys.executable, "-m", "core.cli", *args],
            env={**self.env, **(env or {})},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Serve]:
    base = tmp_path_factory.mktemp("private")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SECONDSTAGE_REDIS_URL"}
    env.update(
        {
            "SECONDSTAGE_VAR_DIR": str(base / "var"),
            "SECONDSTAGE_MODEL": str(demo_model),
            "SECONDSTAGE_SERVED_MODEL_NAME": "demo",
            "SECONDSTAGE_PORT": str(port),
            "SECONDSTAGE_REDIS_RESTART_DELAY_S": str(RESTART_DELAY_S),
            "SECONDSTAGE_REDIS_RESTART_MAX_DELAY_S": str(MAX_DELAY_S),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    log = base / "server.log"
    srv = Serve(f"http://127.0.0.1:{port}", env, base / "var" / "redis", log)
    process = ServerProcess("serve", [sys.executable, "-m", "core.cli", "serve", "--log-level", "info"], env, port, log)
    with running(process):
        yield srv
    # serve's shutdown stopped its child cleanly
    assert not srv.redis.ping(), log_tail(log)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s; serve's log:\n{log_tail(log)}")
        time.sleep(0.05)
    return time.monotonic() - start


def stream_chat(url: str, i: int) -> str:
    """One streamed chat; fails on anything but a complete stream. Returns the completion id."""
    body = {
        "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
        "max_tokens": 48,
        "stream": True,
        "user": "private-redis",
    }
    completion_id = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        completion_id = chunk["id"]
    assert completion_id is not None
    return completion_id


def records_missing(serve: Serve, ids: set[str]) -> set[str]:
    keys = Keys("secondstage")
    try:
        with redis.Redis.from_url(serve.redis.url) as c:
            return {cid for cid in ids if c.get(keys.completion(cid)) is None}
    except redis.ConnectionError:
        return ids


def restarts(serve: Serve, result: str) -> float:
    for line in httpx.get(serve.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'secondstage_redis_restarts_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_sigkill_during_streamed_chat_fails_no_request_and_loses_no_record(serve: Serve) -> None:
    assert serve.health()["redis"] == "up"
    old_pid = serve.child_pid()
    with ThreadPoolExecutor(10) as pool:
        streams = [pool.submit(stream_chat, serve.url, i) for i in range(10)]
        time.sleep(0.3)  # the streams are under way
        serve.kill_child()
        during = [pool.submit(stream_chat, serve.url, i) for i in range(10, 20)]
        seen: list[dict] = []  # type: ignore[type-arg]

        def degraded() -> bool:
            seen.append(serve.health())
            return bool(seen[-1]["status"] == "degraded")

        wait_for(degraded, 5, "degraded while Redis is down", serve.log)
        down = seen[-1]
        ids = {f.result() for f in streams + during}  # raises if any request failed
    assert "killed by SIGKILL" in down["reason"], down
    back = wait_for(lambda: serve.health()["status"] == "ok", 15, "Redis back", serve.log)
    assert back < 15
    assert serve.child_pid() != old_pid and serve.redis.ping()
    # Every record of the outage reaches Redis, with serve still running (the writer replays its spool).
    wait_for(lambda: not records_missing(serve, ids), 30, "all 20 records in Redis", serve.log)
    assert restarts(serve, "ok") == 1
    assert "killed by SIGKILL; restarting it" in serve.log.read_text()


def test_repeated_kills_back_off_without_a_restart_storm(serve: Serve) -> None:
    before = restarts(serve, "ok")
    downtimes = []
    for n in range(1, 4):
        serve.kill_child()
        downtimes.append(wait_for(lambda: serve.redis.ping(), 30, "Redis back", serve.log))
        # The socket answers a moment before the supervisor has finished the restart and counted it.
        wait_for(lambda n=n: restarts(serve, "ok") == before + n, 5, f"restart {n} counted", serve.log)  # type: ignore[misc]
    # Each restart in a row waits twice as long as the one before (capped): no storm of restarts.
    assert downtimes[1] > downtimes[0] * 1.5 and downtimes[2] > downtimes[1] * 1.5, downtimes
    assert downtimes[0] >= RESTART_DELAY_S, downtimes
    time.sleep(1)
    assert restarts(serve, "ok") == before + 3  # one restart per death, no more
    assert stream_chat(serve.url, 99)


def _corrupt_aof(redis_dir: Path) -> dict[Path, bytes]:
    good = {}
    for aof in sorted((redis_dir / "appendonlydir").glob("*.incr.aof")):
        data = aof.read_bytes()
        if len(data) > 20:
            good[aof] = data
            aof.write_bytes(data[:20] + b"GARBAGE!!" + data[20:])
    assert good, "no AOF to corrupt"
    return good


def test_a_redis_that_cannot_come_back_is_degraded_and_align_run_says_why(serve: Serve) -> None:
    wait_for(lambda: serve.health()["status"] == "ok", 30, "Redis up", serve.log)
    wait_for(lambda: serve.redis.ping(), 30, "Redis up", serve.log)
    good = _corrupt_aof(serve.redis_dir)  # a damaged data directory: the next start cannot load it
    serve.kill_child()
    wait_for(lambda: serve.health()["redis"] == "failed", 60, "Redis failed", serve.log)

    health = httpx.get(serve.url + "/health", timeout=10)
    assert health.status_code == 200  # chat traffic still flows
    assert health.json()["status"] == "degraded"
    assert "Bad file format reading the append only file" in health.json()["reason"]
    ready = httpx.get(serve.url + "/health/ready", timeout=10)
    assert ready.status_code == 503 and "cannot be brought back" in ready.json()["error"]["message"]
    outage_ids = {stream_chat(serve.url, i) for i in range(3)}

    # align run does not start a second redis-server on serve's directory: it waits, then says why.
    quick = serve.cli("align", "run", "--dry-run", env={"SECONDSTAGE_REDIS_WAIT_S": "2"})
    out, err = quick.communicate(timeout=300)
    assert quick.returncode == 1, out + err
    message = " ".join(err.split())  # rich wraps long lines
    assert "will not start a second redis-server" in message, err
    assert str(serve.redis_dir.absolute()) in "".join(err.split()), err
    assert not serve.redis.ping()

    # One that may wait long enough gets serve's Redis as soon as the directory is repaired.
    stderr = serve.log.with_name("align-patient.err")
    with stderr.open("w") as err_file:
        patient = serve.cli("align", "run", "--dry-run", env={"SECONDSTAGE_REDIS_WAIT_S": "120"}, stderr=err_file)
    wait_for(lambda: "waiting up to" in stderr.read_text() or patient.poll() is not None, 120, "align waiting", stderr)
    assert patient.poll() is None, stderr.read_text()
    for aof, data in good.items():
        aof.write_bytes(data)
    out, _ = patient.communicate(timeout=300)
    assert patient.returncode == 0, out + stderr.read_text()
    assert serve.health()["status"] == "ok"
    assert restarts(serve, "failed") >= 3
    wait_for(lambda: not records_missing(serve, outage_ids), 30, "the outage's records in Redis", serve.log)
