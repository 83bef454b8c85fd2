"""The load generator against a scripted OpenAI-shaped server: what it counts as a token, a TTFT and a failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.load import chat_body, drive_http


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    content = body["messages"][-1]["content"]
    if content == "refuse":
        return web.json_response({"error": {"message": "no", "param": "messages"}}, status=429)
    if not body["stream"]:
        return web.json_response({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 7}})
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(_sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}))
    await asyncio.sleep(0.05)  # the role chunk is no token: TTFT is taken at the first text
    if content == "break":
        await resp.write(_sse({"error": {"message": "engine died"}}))
        return resp
    for word in ("one", " two", " three"):
        await resp.write(_sse({"choices": [{"index": 0, "delta": {"content": word}}]}))
    await resp.write(_sse({"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 7}}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    async with TestServer(app) as srv:
        yield str(srv.make_url("")).rstrip("/")


async def test_streams_count_tokens_and_time_the_first_text(server: str) -> None:
    bodies = [chat_body("m", f"hi {i}", 3, stream=True) for i in range(6)]
    samples, wall, cores = await drive_http(server, bodies, concurrency=3, warmup=bodies[:1])
    assert len(samples) == 6 and all(s.ok for s in samples)
    assert {(s.completion_tokens, s.prompt_tokens) for s in samples} == {(3, 7)}
    for s in samples:
        assert s.ttft is not None and 0.05 <= s.ttft <= s.latency
    assert wall > 0 and cores["cpu_ms_load_generator"] >= 0


async def test_json_requests_read_usage_and_have_no_ttft(server: str) -> None:
    samples, _, _ = await drive_http(server, [chat_body("m", "hi", 3, stream=False)], concurrency=1, warmup=[])
    assert samples[0].ok and samples[0].ttft is None and samples[0].completion_tokens == 3


async def test_refusals_and_error_chunks_are_failures(server: str) -> None:
    bodies = [chat_body("m", "refuse", 3, stream=True), chat_body("m", "break", 3, stream=True)]
    samples, _, _ = await drive_http(server, bodies, concurrency=1, warmup=[])
    assert [s.ok for s in samples] == [False, False]
    errors = sorted(s.error or "" for s in samples)
    assert errors[0].startswith("HTTP 429") and "engine died" in errors[1]


async def test_a_server_that_refuses_every_warmup_is_an_error(server: str) -> None:
    with pytest.raises(RuntimeError, match="every warm-up request"):
        await drive_http(server, [], concurrency=1, warmup=[chat_body("m", "refuse", 3, stream=True)])
