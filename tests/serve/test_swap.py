"""Hot-swap over a fake engine: events and reconciliation, pinning, unload, rollback, broken adapters."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.versions import BASE, Manifest, Registry, VersionStore
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

MSG = [{"role": "user", "content": "hi"}]


def _publish(settings: ServeSettings, name: str, tmp_path: Path) -> None:
    adapter = tmp_path / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    VersionStore(settings.versions_dir).write(Manifest(version=name, base_model="demo"), adapter)
    registry = Registry(redis.Redis.from_url(settings.redis_url), Keys(settings.redis_prefix))
    registry.register(VersionStore(settings.versions_dir).manifest(name))
    registry.activate(name)


def _wait_version(client: TestClient, name: str, timeout: float = 5) -> str:
    deadline = time.time() + timeout
    fp = ""
    while time.time() < deadline:
        fp = client.post("/v1/chat/completions", json={"messages": MSG}).json()["system_fingerprint"]
        if fp == name:
            return fp
        time.sleep(0.05)
    return fp


def test_new_version_served_then_rollback(client: TestClient, settings: ServeSettings, tmp_path: Path) -> None:
    _publish(settings, "v1", tmp_path)
    assert _wait_version(client, "v1") == "v1"
    body = client.post("/v1/chat/completions", json={"messages": MSG}).json()
    assert body["choices"][0]["message"]["content"].startswith("[v1]")
    assert client.get("/v1/models").json()["data"][0]["version"] == "v1"
    Registry(redis.Redis.from_url(settings.redis_url), Keys(settings.redis_prefix)).activate(BASE)
    assert _wait_version(client, BASE) == BASE
    metrics = client.get("/metrics").text
    assert 'secondstage_swaps_total{result="ok"} 2.0' in metrics


def test_missed_event_is_reconciled(client: TestClient, settings: ServeSettings, tmp_path: Path) -> None:
    adapter = tmp_path / "a"
    adapter.mkdir()
    store = VersionStore(settings.versions_dir)
    store.write(Manifest(version="v2", base_model="demo"), adapter)
    rc = redis.Redis.from_url(settings.redis_url)
    keys = Keys(settings.redis_prefix)
    Registry(rc, keys).register(store.manifest("v2"))
    rc.set(keys.active_version, "v2")  # no event published: only reconciliation can find it
    assert _wait_version(client, "v2") == "v2"


def test_broken_adapter_keeps_serving(
    client: TestClient, settings: ServeSettings, fake_llm: FakeLLM, tmp_path: Path
) -> None:
    fake_llm.fail_lora = True
    _publish(settings, "v1", tmp_path)
    deadline = time.monotonic() + 10
    while 'secondstage_swaps_total{result="error"}' not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the failed swap was never counted"
        time.sleep(0.05)
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200 and r.json()["system_fingerprint"] == BASE
    assert 'secondstage_swaps_total{result="error"}' in client.get("/metrics").text


async def test_running_request_keeps_its_version(settings: ServeSettings, tmp_path: Path) -> None:
    llm = FakeLLM(delay=0.01)
    engine = fake_engine(llm, settings)
    for name in ("v1", "v2"):
        adapter = tmp_path / name
        adapter.mkdir()
        engine.store.write(Manifest(version=name, base_model="demo"), adapter)
    await engine.activate("v1")
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(max_tokens=40, output_kind=RequestOutputKind.DELTA)
    texts: list[str] = []

    started = asyncio.Event()

    async def run() -> str:
        with engine.pin() as version:
            out = []
            async for o in engine.generate(list(b"<user>hello there friend<assistant>"), params, "r1", version):
                out.append(o.outputs[0].text)
                started.set()
            return "".join(out)

    task = asyncio.create_task(run())
    await asyncio.wait_for(started.wait(), 10)  # the request is generating on v1, however slow the machine
    await engine.activate("v2")  # mid-request swap
    assert engine.loaded_versions() == ["v1", "v2"]  # v1 still has a request on it
    texts.append(await task)
    await asyncio.sleep(0.01)
    assert texts[0].startswith("[v1]")
    assert engine.loaded_versions() == ["v2"]  # freed once its last request finished
    assert 1 not in llm.loras


@pytest.mark.parametrize("n", [1])
def test_disconnect_aborts_engine_request(settings: ServeSettings, n: int) -> None:
    """Closing a stream early aborts the engine request (checked through the engine's abort calls)."""
    llm = FakeLLM(delay=0.02)
    engine = fake_engine(llm, settings)
    from serve.app import build_app

    with TestClient(build_app(settings, engine=engine)) as c:
        with c.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, "n": n}) as r:
            for line in r.iter_lines():
                if '"content":"e"' in line:
                    break
        deadline = time.time() + 5
        while not llm.aborted and time.time() < deadline:
            time.sleep(0.05)
        assert llm.aborted, "engine request was not aborted"
        assert not llm.running
