"""The shared SSE framing: data events, usage left out when absent, an error after the 200 as the last chunk, [DONE].

Unit tests of `serve/services/sse.py`, then the same promise over both streaming routes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve.app import build_app
from serve.errors import BadRequest
from serve.protocol import UsageInfo
from serve.services.sse import DONE, event, sse
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, FakeOutput, fake_engine


class Chunk(BaseModel):
    text: str
    usage: UsageInfo | None = None


async def _collect(stream: AsyncGenerator[str, None]) -> list[str]:
    return [line async for line in stream]


async def _chunks(*texts: str, fail: BaseException | None = None) -> AsyncGenerator[BaseModel, None]:
    for text in texts:
        yield Chunk(text=text)
    if fail is not None:
        raise fail


def test_event_leaves_out_absent_usage() -> None:
    assert json.loads(event(Chunk(text="a"))[6:]) == {"text": "a"}
    with_usage = json.loads(event(Chunk(text="", usage=UsageInfo(prompt_tokens=1, total_tokens=1)))[6:])
    assert with_usage["usage"]["prompt_tokens"] == 1
    assert event(Chunk(text="a")).endswith("\n\n")


async def test_chunks_then_done() -> None:
    lines = await _collect(sse(_chunks("a", "b"), "s1"))
    assert lines == ['data: {"text":"a"}\n\n', 'data: {"text":"b"}\n\n', DONE]


async def test_error_after_200_is_an_error_chunk_then_done() -> None:
    lines = await _collect(sse(_chunks("a", fail=RuntimeError("engine died")), "s2"))
    assert lines[0] == 'data: {"text":"a"}\n\n' and lines[-1] == DONE and len(lines) == 3
    error = json.loads(lines[1][6:])["error"]
    # An unknown exception is our bug: a 500 that does not leak its message.
    assert error["code"] == 500 and error["type"] == "InternalServerError"
    assert "engine died" not in error["message"]


async def test_domain_error_keeps_its_type_and_param() -> None:
    lines = await _collect(sse(_chunks(fail=BadRequest("n: too many", param="n")), "s3"))
    assert lines[-1] == DONE
    assert json.loads(lines[0][6:]) == {
        "error": {"message": "n: too many", "type": "BadRequestError", "param": "n", "code": 400}
    }


async def test_closing_the_stream_closes_its_source() -> None:
    closed = []

    async def source() -> AsyncGenerator[BaseModel, None]:
        try:
            while True:
                yield Chunk(text="x")
        finally:
            closed.append(True)  # where the generation pipeline aborts its engine request

    stream = sse(source(), "s4")
    assert await stream.__anext__() == 'data: {"text":"x"}\n\n'
    await stream.aclose()
    assert closed == [True]


class DyingLLM(FakeLLM):
    """Sends its first output, then fails: the 200 of a stream is already out."""

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, **kw: Any
    ) -> AsyncIterator[FakeOutput]:
        async with contextlib.aclosing(super().generate(prompt, params, request_id, **kw)) as outputs:
            async for out in outputs:
                yield out
                raise RuntimeError("engine died")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
        ("/v1/completions", {"prompt": ["<user>a", "<user>b"]}),
    ],
)
def test_routes_send_an_error_after_200_as_a_chunk(settings: ServeSettings, path: str, body: dict[str, Any]) -> None:
    with (
        TestClient(build_app(settings, engine=fake_engine(DyingLLM(), settings))) as client,
        client.stream("POST", path, json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 2, events
    assert json.loads(events[-2])["error"]["code"] == 500
    assert all("error" not in json.loads(e) for e in events[:-2])
