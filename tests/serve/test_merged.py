"""Merged-weights mode over a fake engine: swaps by reload, no mixed versions, failures that keep chat up, canaries.

The fake engine (tests/fakes.py) answers with the version whose weights it holds (`[v1] ...`), fails a request
whose weights change under it, and refuses a reload while it runs; the fake weights source makes directories
instead of merging. The real reload and the exactness of merged answers are tested on vLLM in
tests/e2e/test_merged.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.keys import Keys
from core.merge import MergeError
from core.versions import BASE, Manifest, Registry, VersionStore
from serve.engine import ModelEngine
from serve.errors import Unavailable
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, FakeMergedWeights, fake_engine

PROMPT = list(b"<user>hello there<assistant>")


def _write(engine: ModelEngine, tmp_path: Path, *names: str) -> None:
    for name in names:
        adapter = tmp_path / f"adapter-{name}"
        adapter.mkdir()
        engine.store.write(Manifest(version=name, base_model="demo"), adapter)


def _source(engine: ModelEngine) -> FakeMergedWeights:
    assert isinstance(engine.weights_source, FakeMergedWeights)
    return engine.weights_source


def _params(max_tokens: int = 40) -> Any:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)


async def _ask(engine: ModelEngine, rid: str, identity: str | None = None) -> tuple[str, str]:
    """(version the request was pinned to, the text the engine made) for one request."""
    with engine.pin(identity) as version:
        out = [o.outputs[0].text async for o in engine.generate(PROMPT, _params(), rid, version)]
        return version.name, "".join(out)


@pytest.fixture
def llm() -> FakeLLM:
    return FakeLLM()


@pytest.fixture
def merged(llm: FakeLLM, settings: ServeSettings) -> ModelEngine:
    return fake_engine(llm, settings, merged=True)


async def test_swap_reloads_merged_weights_and_requests_carry_no_lora(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    _write(merged, tmp_path, "v1")
    await merged.activate("v1")
    name, text = await _ask(merged, "r1")
    assert (name, text[:5], merged.weights) == ("v1", "[v1] ", "v1")
    assert llm.seen[-1]["lora"] is None and llm.loras == {}  # the incumbent is the weights, not an adapter
    assert llm.reloads == [str(merged.store.path("v1") / "merged")]
    assert llm.prefix_resets == 1 and not llm.paused
    # Rollback = another reload, of the base model's own directory.
    await merged.activate(BASE)
    name, text = await _ask(merged, "r2")
    assert (name, text[:4], llm.reloads[-1]) == (BASE, "echo", str(_source(merged).path(BASE)))
    assert llm.prefix_resets == 2


async def test_no_mixed_versions_across_a_swap_under_load(merged: ModelEngine, llm: FakeLLM, tmp_path: Path) -> None:
    """Requests start before, during and after a swap: every one succeeds, and the weights that made its text
    are the version it is labelled with (the fake fails a request whose weights change under it). Requests take
    a while to reach the engine, so a pause can overtake one: the swap must wait until the engine has each."""
    llm.delay, llm.submit_delay = 0.002, 0.005
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    results: list[tuple[str, str]] = []
    swapped = asyncio.Event()

    async def client(i: int) -> None:
        await asyncio.sleep(0.003 * i)  # staggered, so some request is always on its way to the engine
        for j in range(100):
            results.append(await _ask(merged, f"c{i}-{j}"))
            if swapped.is_set():
                return

    clients = [asyncio.create_task(client(i)) for i in range(8)]
    await asyncio.sleep(0.1)
    await merged.activate("v2")
    swapped.set()
    await asyncio.gather(*clients)
    labels = {name for name, _ in results}
    assert labels == {"v1", "v2"}, labels  # the swap happened while they ran
    for name, text in results:
        assert text.startswith(f"[{name}] "), (name, text)


async def test_swap_waits_for_a_request_still_on_its_way_to_the_engine(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    """A pause sent while a request is being submitted overtakes it (the engine holds it, then runs it on the
    new weights): the swap must wait until the engine has produced its first output."""
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    llm.submit_delay = 0.05
    request = asyncio.create_task(_ask(merged, "in-transit"))
    await asyncio.sleep(0.01)  # pinned to v1, not yet in the engine (llm.running is empty)
    assert not llm.running
    await merged.activate("v2")
    assert await request == ("v1", "[v1] echo: hello there")


async def test_a_slow_swap_holds_new_requests_and_labels_them_with_the_new_version(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    llm.delay = 0.01
    _write(merged, tmp_path, "v1")
    running = asyncio.create_task(_ask(merged, "old"))  # on base, mid-stream when the swap starts
    while not llm.running:
        await asyncio.sleep(0.001)
    swap = asyncio.create_task(merged.activate("v1"))
    while merged.current.name != "v1":
        await asyncio.sleep(0.001)
    newcomer = asyncio.create_task(_ask(merged, "new"))  # routed to v1 before its weights are in
    assert await running == (BASE, "echo: hello there")
    await swap
    assert await newcomer == ("v1", "[v1] echo: hello there")


async def test_failed_merge_keeps_serving_and_is_retried(merged: ModelEngine, llm: FakeLLM, tmp_path: Path) -> None:
    _write(merged, tmp_path, "v1")
    _source(merged).fail.add("v1")
    with pytest.raises(Exception, match="merging version v1 failed"):
        await merged.activate("v1")
    assert merged.current.name == BASE and llm.reloads == []  # nothing changed
    assert await _ask(merged, "r1") == (BASE, "echo: hello there")
    _source(merged).fail.clear()
    await merged.activate("v1")
    assert await _ask(merged, "r2") == ("v1", "[v1] echo: hello there")


async def test_failed_reload_restores_the_old_weights(merged: ModelEngine, llm: FakeLLM, tmp_path: Path) -> None:
    llm.delay = 0.01
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    llm.fail_reload.add(str(merged.store.path("v2") / "merged"))
    swap = asyncio.create_task(merged.activate("v2"))
    while merged.current.name != "v2":
        await asyncio.sleep(0.001)
    waiting = asyncio.create_task(_ask(merged, "waits-for-v2"))
    with pytest.raises(RuntimeError, match="cannot load weights"):
        await swap
    # The old weights are back (reloaded from their directory) and serve; the request that waited for v2 gets a
    # retryable 503 rather than v1's text under v2's name.
    assert llm.reloads[-2:] == [str(merged.store.path(v) / "merged") for v in ("v2", "v1")]
    assert (merged.current.name, merged.weights, llm.weights) == ("v1", "v1", "v1")
    with pytest.raises(Unavailable, match="v2 stopped being served"):
        await waiting
    assert await _ask(merged, "after") == ("v1", "[v1] echo: hello there")
    await merged.check_health()
    assert llm.healthy  # nothing ran on the half-loaded weights between the failed reload and the restore


async def test_reload_and_restore_failing_reports_unhealthy_until_a_reload_works(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    llm.fail_reload |= {str(merged.store.path(v) / "merged") for v in ("v1", "v2")}
    with pytest.raises(RuntimeError):
        await merged.activate("v2")
    with pytest.raises(RuntimeError, match="restoring v1's weights failed"):
        await merged.check_health()
    with pytest.raises(Unavailable, match="could not be restored"):
        await _ask(merged, "r1")  # never text from corrupt weights
    llm.fail_reload.clear()
    await merged.activate("v2")
    await merged.check_health()
    assert await _ask(merged, "r2") == ("v2", "[v2] echo: hello there")


async def test_canary_is_a_delta_from_the_merged_incumbent_and_promotion_reloads(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    await merged.set_canary("v2", share=1.0, run="run1", since=time.time())
    assert _source(merged).deltas == [("v2", "v1")] and _source(merged).prepared == ["v2"]
    (lora,) = llm.loras.values()
    assert lora.lora_path == str(merged.store.path("v2") / "delta-from-v1")  # not v2's own adapter
    assert await _ask(merged, "c", identity="anyone") == ("v2", "[v2] echo: hello there")
    assert llm.seen[-1]["weights"] == "v1"  # the delta runs on v1's merged weights
    await merged.activate("v2")  # promotion
    assert merged.canary is None and merged.weights == "v2" and llm.loras == {}  # the delta is freed
    assert await _ask(merged, "p", identity="anyone") == ("v2", "[v2] echo: hello there")
    assert llm.seen[-1]["lora"] is None


async def test_canary_beside_base_is_its_own_adapter(merged: ModelEngine, llm: FakeLLM, tmp_path: Path) -> None:
    _write(merged, tmp_path, "v1")
    await merged.set_canary("v1", share=1.0, run="run1", since=time.time())
    (lora,) = llm.loras.values()
    assert lora.lora_path == str(merged.store.adapter_path("v1"))


async def test_canary_whose_delta_exceeds_the_rank_is_refused(
    merged: ModelEngine, llm: FakeLLM, tmp_path: Path
) -> None:
    _write(merged, tmp_path, "v1", "v2")
    await merged.activate("v1")
    _source(merged).delta_rank = 32  # above the engine's 16
    with pytest.raises(MergeError, match=r"rank 32.*SECONDSTAGE_MAX_LORA_RANK to at least 32"):
        await merged.set_canary("v2", share=1.0, run="run1", since=time.time())
    assert merged.canary is None and llm.loras == {}
    assert await _ask(merged, "r", identity="anyone") == ("v1", "[v1] echo: hello there")


def test_failed_merge_is_reported_as_skew_over_http(settings: ServeSettings, tmp_path: Path) -> None:
    """Through the app and the version watcher: a version whose merge fails is counted as a failed swap, the
    replica reports the skew on /health and keeps answering on the weights it had."""
    from serve.app import build_app

    llm = FakeLLM()
    engine = fake_engine(llm, settings, merged=True)
    _source(engine).fail.add("v1")
    with TestClient(build_app(settings, engine=engine)) as client:
        _write(engine, tmp_path, "v1")
        registry = Registry(redis.Redis.from_url(settings.redis_url), Keys(settings.redis_prefix))
        registry.register(VersionStore(settings.versions_dir).manifest("v1"))
        registry.activate("v1")
        deadline = time.monotonic() + 10
        while 'secondstage_swaps_total{result="error"}' not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the failed merge was never counted"
            time.sleep(0.05)
        health = client.get("/health").json()
        assert health["skew"] is True and health["status"] == "degraded" and health["version"] == BASE
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["system_fingerprint"] == BASE
        _source(engine).fail.clear()  # the watcher retries with backoff and gets there
        deadline = time.monotonic() + 15
        while client.get("/health").json()["version"] != "v1":
            assert time.monotonic() < deadline, "the retried merge never swapped"
            time.sleep(0.1)
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["system_fingerprint"] == "v1" and r.json()["choices"][0]["message"]["content"].startswith(
            "[v1]"
        )
