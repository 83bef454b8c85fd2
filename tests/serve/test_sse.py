"""The shared SSE framing: data events, usage left out when absent, an error after the 200 as the last chunk, [DONE].

Unit tests of `serve/services/sse.py`, then the same promise over both streaming routes; and the chat stream's
pre-encoded chunks (`ChunkFrames`), byte for byte what the pydantic chunk model writes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pydantic_core
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve.app import build_app
from serve.errors import BadRequest
from serve.protocol import ChatCompletionChunk, DeltaMessage, StreamChoice, UsageInfo
from serve.services.chat import ChunkFrames, _json
from serve.services.sse import DONE, event, sse
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, FakeOutput, fake_engine


class Chunk(BaseModel):
    text: str
    usage: UsageInfo | None = None


async def _collect(stream: AsyncGenerator[bytes, None]) -> list[bytes]:
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
    assert event(Chunk(text="a")).endswith(b"\n\n")


async def test_chunks_then_done() -> None:
    lines = await _collect(sse(_chunks("a", "b"), "s1"))
    assert lines == [b'data: {"text":"a"}\n\n', b'data: {"text":"b"}\n\n', DONE]


async def test_error_after_200_is_an_error_chunk_then_done() -> None:
    lines = await _collect(sse(_chunks("a", fail=RuntimeError("engine died")), "s2"))
    assert lines[0] == b'data: {"text":"a"}\n\n' and lines[-1] == DONE and len(lines) == 3
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
    assert await stream.__anext__() == b'data: {"text":"x"}\n\n'
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


TEXTS = [
    "",
    "x",
    " the",
    'say "hi"',
    "back\\slash",
    "line\nbreak\ttab\r",
    "\x00\x01\x1f\x7f",
    "é 漢字 🦊",
    "\u2028\u2029",
]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("index", "finish"), [(0, None), (0, "stop"), (3, "length"), (17, "content_filter")])
def test_chunk_frames_are_the_bytes_the_model_writes(text: str, index: int, finish: str | None) -> None:
    job_id, created, model, version = "chatcmpl-0192f0c1a2b37c4d8e9f00112233aabb", 1764500000, "demo", "v12"
    model_chunk = ChatCompletionChunk(
        id=job_id,
        created=created,
        model=model,
        choices=[StreamChoice(index=index, delta=DeltaMessage(content=text), finish_reason=finish)],
        system_fingerprint=version,
    )
    assert ChunkFrames(job_id, created, model, version).delta(index, text, finish) == event(model_chunk)


def test_text_encoding_is_pydantics_for_every_code_point() -> None:
    # Every code point but the surrogates (a str from the detokenizer never holds a lone one).
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    assert _json.encode(text) == pydantic_core.to_json(text)
