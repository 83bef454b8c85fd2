"""JSON requests ask the engine for its final output only (`FINAL_ONLY`), streams for each step (`DELTA`).

The fake engine yields as vLLM does for each kind (tests/fakes.py): for FINAL_ONLY one output at the end,
each choice's whole text, token ids and logprobs. What a JSON answer holds (text, n, logprobs, usage,
record) must not change; a JSON request has no time to first token; a client leaving mid-generation still
aborts the engine request and is recorded as aborted. The output policy on whole text against streamed
deltas: tests/serve/test_chat_policies.py (same text both ways) and tests/core/policy/test_stream.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import redis
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from vllm.sampling_params import RequestOutputKind

from core.keys import Keys
from serve.caller import Caller
from serve.metrics import Metrics
from serve.protocol import ChatCompletionRequest
from serve.services.generation import Pipeline, Prompt
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, fake_engine

MSG = [{"role": "user", "content": "hello"}]
LATENCY = {"route": "/v1/chat/completions", "stream": "false", "version": "base"}


def _record(settings: ServeSettings, cid: str) -> dict:  # type: ignore[type-arg]
    rc = redis.Redis.from_url(settings.redis_url)
    key = Keys(settings.redis_prefix).completion(cid)
    deadline = time.time() + 5
    while rc.get(key) is None and time.time() < deadline:
        time.sleep(0.05)
    raw = rc.get(key)
    assert raw is not None
    return json.loads(raw)  # type: ignore[no-any-return]


def test_json_asks_final_only_and_streams_delta(client: TestClient, fake_llm: FakeLLM) -> None:
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "echo: hello"
    assert fake_llm.seen[-1]["params"].output_kind == RequestOutputKind.FINAL_ONLY
    with client.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}) as s:
        s.read()
    assert fake_llm.seen[-1]["params"].output_kind == RequestOutputKind.DELTA
    r = client.post("/v1/completions", json={"prompt": "<user>hi", "max_tokens": 8})
    assert r.status_code == 200 and fake_llm.seen[-1]["params"].output_kind == RequestOutputKind.FINAL_ONLY


def test_the_engine_gets_rendered_token_input(client: TestClient, fake_llm: FakeLLM) -> None:
    # vLLM re-renders a bare {"prompt_token_ids": ...} in its thread pool; a rendered TokensInput goes straight in.
    client.post("/v1/chat/completions", json={"messages": MSG})
    client.post("/v1/completions", json={"prompt": [60, 61], "max_tokens": 4})
    assert [s["input_type"] for s in fake_llm.seen[-2:]] == ["token", "token"]


def test_json_n_logprobs_and_usage_from_one_final_output(client: TestClient) -> None:
    body = {"messages": MSG, "n": 2, "logprobs": True, "top_logprobs": 2, "max_tokens": 8}
    r = client.post("/v1/chat/completions", json=body).json()
    assert [c["message"]["content"] for c in r["choices"]] == ["echo: he", "echo: he"]
    assert all(c["finish_reason"] == "length" for c in r["choices"])
    for c in r["choices"]:
        content = c["logprobs"]["content"]
        assert [t["token"] for t in content] == list("echo: he")  # all of them, from the one final output
        assert all(t["top_logprobs"][0]["token"] == t["token"] for t in content)
    assert r["usage"]["completion_tokens"] == 16
    legacy = client.post("/v1/completions", json={"prompt": "<user>hi", "max_tokens": 5, "logprobs": 1}).json()
    assert legacy["choices"][0]["logprobs"]["tokens"] == list("echo:")
    assert legacy["choices"][0]["logprobs"]["text_offset"] == [0, 1, 2, 3, 4]


def test_ttft_counts_streamed_requests_only(client: TestClient, settings: ServeSettings) -> None:
    """A JSON answer is sent whole: no time to first token in its record or the histogram."""
    plain = client.post("/v1/chat/completions", json={"messages": MSG}).json()["id"]
    assert _record(settings, plain)["ttft_s"] is None
    with client.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True}) as s:
        lines = list(s.iter_lines())
    streamed = next(json.loads(line[6:])["id"] for line in lines if line.startswith("data: {"))
    assert _record(settings, streamed)["ttft_s"] > 0
    metrics = client.get("/metrics").text
    [count] = [
        line for line in metrics.splitlines() if line.startswith("secondstage_time_to_first_token_seconds_count")
    ]
    assert count.endswith(" 1.0"), count  # the streamed one only
    latency = [
        line for line in metrics.splitlines() if line.startswith("secondstage_request_latency_seconds_count")
    ]  # fmt: skip
    assert sum(float(line.rsplit(" ", 1)[1]) for line in latency) == 2.0  # both have a latency


async def test_json_client_leaving_aborts_and_is_recorded(settings: ServeSettings) -> None:
    """Cancelled mid-generation (the route cancels on a disconnect) inside `start`'s one await: the engine
    request is aborted and the request ends as aborted (latency observed), as a stream's would."""
    llm = FakeLLM(delay=0.02)
    engine = fake_engine(llm, settings)
    registry = CollectorRegistry()
    pipeline = Pipeline(engine, None, Metrics(registry, "demo"))
    job = pipeline.prepare(ChatCompletionRequest(messages=MSG), Caller(), Prompt.chat(MSG), "chatcmpl-x")

    async def complete() -> None:
        async for _ in await pipeline.start(job):
            pass

    task = asyncio.create_task(complete())
    while not llm.running:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # a few tokens in, none of them sent (FINAL_ONLY)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert llm.aborted == ["chatcmpl-x"]
    assert job.status == "aborted" and not job.failed and job.first_token_at is None
    assert registry.get_sample_value("secondstage_request_latency_seconds_count", LATENCY) == 1.0


async def test_json_refused_by_the_engine_is_not_recorded(settings: ServeSettings) -> None:
    """The engine rejecting the request (a client error) ends it before it ran: an HTTP error, no record."""
    from vllm.exceptions import VLLMValidationError

    llm = FakeLLM()
    engine = fake_engine(llm, settings)

    async def refuse(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        raise VLLMValidationError("prompt too long", parameter="messages")
        yield  # an async generator, as vLLM's

    llm.generate = refuse  # type: ignore[method-assign]
    registry = CollectorRegistry()
    pipeline = Pipeline(engine, None, Metrics(registry, "demo"))
    job = pipeline.prepare(ChatCompletionRequest(messages=MSG), Caller(), Prompt.chat(MSG), "chatcmpl-y")
    try:
        await pipeline.start(job)
    except VLLMValidationError:
        pass
    else:
        raise AssertionError("the engine's refusal did not surface from start()")
    assert job.status == "ok"
    assert registry.get_sample_value("secondstage_request_latency_seconds_count", LATENCY) is None
