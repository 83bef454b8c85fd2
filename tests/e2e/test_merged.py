"""Merged-weights mode on real parts: `secondstage serve` (real vLLM on the demo model) with
SECONDSTAGE_MERGED_WEIGHTS=true, a real Redis, versions written and activated as align and operators do.

Two LoRA versions with random A and B (bench/swap.py's `make_adapters`, so each answers differently from the
base). On one server:

- exact: v1's greedy answers (tokens, via logprobs) as a LoRA adapter — v1 as a canary beside the base, which
  is v1's own adapter on every request, what LoRA mode serves — equal v1's answers from its merged weights
  once promoted; and v2 as a canary beside merged v1 (the delta adapter: v2's update minus v1's, rank 16)
  equals v2's own adapter beside the base. Canaries are started and promoted with the operator's CLI.
- swap under load: streams run while the active version goes v1 → v2 → base (merged swaps: pause, reload,
  prefix-cache reset, resume); every request succeeds and every stream's chunks name one version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from bench.harness import ROOT, ServerProcess, ensure_demo_model, running, secondstage_server, short_tmpdir
from core.keys import Keys
from core.redis_server import PrivateRedis
from core.versions import BASE, Manifest, Registry, VersionStore

pytestmark = pytest.mark.slow

PROMPTS = ["What colour is the sky?", "What is the capital of France?", "What sound does a cow make?"]


@dataclass
class Merged:
    server: ServerProcess
    redis: PrivateRedis
    var: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *args],
            env=self.server.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    @property
    def registry(self) -> Registry:
        return Registry(redis.Redis.from_url(self.redis.url), Keys())


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Merged]:
    from bench.swap import make_adapters

    model = ensure_demo_model()
    base = short_tmpdir("merged-")
    tmp = tmp_path_factory.mktemp("merged")
    redis_server = PrivateRedis(base / "redis")
    redis_server.start()
    var = tmp / "var"
    store = VersionStore(var / "models" / "versions")
    registry = Registry(redis.Redis.from_url(redis_server.url), Keys())
    for i, adapter in enumerate(make_adapters(2, tmp / "adapters"), start=1):
        store.write(Manifest(version=f"v{i}", base_model=str(model), lora_rank=8), adapter)
        registry.register(store.manifest(f"v{i}"))
    server = secondstage_server(
        redis_url=redis_server.url,
        var_dir=var,
        log=tmp / "server.log",
        model=model,
        engine=None,
        log_level="info",
        extra_env={
            "SECONDSTAGE_MERGED_WEIGHTS": "true",
            "SECONDSTAGE_RECONCILE_INTERVAL_S": "1",
            "SECONDSTAGE_KV_CACHE_MEMORY_FRACTION": "0.05",
            "SECONDSTAGE_CANARY_MIN_DURATION_S": "86400",  # only the test decides
        },
    )
    try:
        with running(server):
            yield Merged(server, redis_server, var)
    finally:
        redis_server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _answer(server: ServerProcess, prompt: str) -> tuple[str, list[str]]:
    """(system_fingerprint, greedy tokens) of one answer."""
    body = {
        "model": "demo",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 24,
        "logprobs": True,
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    return data["system_fingerprint"], [t["token"] for t in data["choices"][0]["logprobs"]["content"]]


def _answers(server: ServerProcess, version: str) -> list[list[str]]:
    out = []
    for prompt in PROMPTS:
        fingerprint, tokens = _answer(server, prompt)
        assert fingerprint == version, (fingerprint, version)
        out.append(tokens)
    return out


def _wait_served(server: ServerProcess, version: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _answer(server, PROMPTS[0])[0] != version:
        assert time.monotonic() < deadline, f"{version} not served within {timeout}s:\n{server.tail(30)}"
        time.sleep(0.3)


def _canary(m: Merged, version: str) -> None:
    # A share just under 1 (the CLI's bound); the test's single caller is in it unless the run's hash says
    # otherwise, in which case a new run is started.
    for _ in range(5):
        done = m.cli("versions", "canary", version, "--share", "0.999")
        assert done.returncode == 0, done.stdout + done.stderr
        try:
            _wait_served(m.server, version, timeout=60)
            return
        except AssertionError:
            continue
    raise AssertionError(f"the canary {version} never served the test's caller")


def test_merged_answers_equal_lora_answers(merged: Merged) -> None:
    base = _answers(merged.server, BASE)
    _canary(merged, "v1")  # beside the base: v1's own adapter on every request
    v1_lora = _answers(merged.server, "v1")
    assert v1_lora != base, "the adapter does not change the answers: the comparison would prove nothing"
    _canary(merged, "v2")  # supersedes v1's canary; still beside the base
    v2_lora = _answers(merged.server, "v2")
    assert v2_lora != v1_lora

    merged.registry.activate("v1")  # v1's merged weights: a reload
    _wait_served(merged.server, "v1")
    assert _answers(merged.server, "v1") == v1_lora
    assert (merged.var / "models" / "versions" / "v1" / "merged" / "model.safetensors").is_file()

    _canary(merged, "v2")  # beside merged v1: the delta adapter (v2's update minus v1's)
    assert (merged.var / "models" / "versions" / "v2" / "delta-from-v1" / "adapter_config.json").is_file()
    assert _answers(merged.server, "v2") == v2_lora
    done = merged.cli("versions", "promote", "v2")
    assert done.returncode == 0, done.stdout + done.stderr
    _wait_served(merged.server, "v2")
    assert _answers(merged.server, "v2") == v2_lora

    merged.registry.activate(BASE)  # rollback to the base: a reload of the base model's own weights
    _wait_served(merged.server, BASE)
    assert _answers(merged.server, BASE) == base


def test_merged_swaps_under_streams_fail_nothing_and_mix_nothing(merged: Merged) -> None:
    results: list[tuple[set[str], str | None]] = []
    stop = threading.Event()

    def streamer(i: int) -> None:
        with httpx.Client(timeout=300) as client:
            n = 0
            while not stop.is_set():
                n += 1
                body = {
                    "model": "demo",
                    "messages": [{"role": "user", "content": f"Request {i}-{n}: {PROMPTS[n % len(PROMPTS)]}"}],
                    "max_tokens": 24,
                    "ignore_eos": True,
                    "stream": True,
                }
                fingerprints: set[str] = set()
                error: str | None = "no [DONE]"
                try:
                    with client.stream("POST", merged.server.url + "/v1/chat/completions", json=body) as r:
                        if r.status_code != 200:
                            error = f"HTTP {r.status_code}"
                            r.read()
                        else:
                            for line in r.iter_lines():
                                if line == "data: [DONE]":
                                    error = None if error == "no [DONE]" else error
                                elif line.startswith("data: ") and '"error"' in line:
                                    error = line[:200]
                                elif line.startswith("data: "):
                                    fingerprints.add(httpx.Response(200, content=line[6:]).json()["system_fingerprint"])
                except httpx.HTTPError as exc:
                    error = repr(exc)
                results.append((fingerprints, error))

    threads = [threading.Thread(target=streamer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for version in ("v1", "v2", BASE):
            time.sleep(1.0)
            merged.registry.activate(version)
            _wait_served(merged.server, version)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    served = {next(iter(f)) for f, _ in results if len(f) == 1}
    failed = [e for _, e in results if e is not None]
    mixed = [f for f, _ in results if len(f) != 1]
    assert not failed, failed[:3]
    assert not mixed, mixed[:3]
    assert {"v1", "v2", BASE} <= served, served  # streams ran on every version, across the swaps
    log = merged.server.log.read_text(errors="replace")
    assert log.count("weights of ") >= 3 and "restoring" not in log
