"""A streamed answer reaches the client piece by piece, over a real socket, while the engine still generates.

The app runs under uvicorn (as `secondstage serve` runs it) on a loopback port, over a fake engine that
produces every token but the last, then waits until the client has read some answer text: if anything
between the engine and the socket (pipeline, output policy, SSE framing, middlewares, uvicorn) held the
stream back until its end, the last token would never be produced. The wait is bounded only so a
regression fails instead of hanging; the assertions are about order, not time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from serve.app import build_app
from serve.cli import UVICORN_OPTIONS
from serve.settings import ServeSettings
from tests.fakes import FakeLLM, FakeOutput, fake_engine

ROOT = Path(__file__).resolve().parents[2]
ANSWER = "Hello there, friend."
HANG_GUARD_S = 30.0  # a buffered stream deadlocks (the engine waits for the client): fail, do not hang


@dataclass
class GatedLLM(FakeLLM):
    """Holds the last token back until `client_read` is set; notes what it produced, and when (in order)."""

    client_read: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[str] = field(default_factory=list)

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[FakeOutput]:
        async for out in super().generate(prompt, params, request_id, lora_request, priority):
            if out.finished:
                await self.client_read.wait()
                self.events.append("engine: last token")
            yield out


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Each test on asyncio's loop and on uvloop (what `secondstage serve` runs where it is installed)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


@contextlib.asynccontextmanager
async def serving(settings: ServeSettings, llm: GatedLLM) -> AsyncIterator[int]:
    """The app under uvicorn on a free loopback port, on the test's loop (asyncio's, then uvloop)."""
    app = build_app(settings, engine=fake_engine(llm, settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **UVICORN_OPTIONS))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # startup failed: raise its error
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def stream_chat(port: int, llm: GatedLLM) -> str:
    """POST a streamed chat over a raw socket; set `client_read` at the first answer text; return all the text."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps(
        {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "stream": True}
    ).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
    )
    await writer.drain()
    text: list[str] = []
    try:
        while True:
            line = await reader.readline()  # chunked framing lines are skipped: only `data:` lines matter
            if not line:
                return "".join(text)
            if not line.startswith(b"data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                content = choice["delta"].get("content") or ""
                if content and not llm.client_read.is_set():
                    llm.events.append("client: first text")
                    llm.client_read.set()
                text.append(content)
    finally:
        writer.close()


@pytest.mark.parametrize("policies", [False, True], ids=["no-policies", "repo-policies"])
async def test_client_reads_text_before_the_engine_finishes(settings: ServeSettings, policies: bool) -> None:
    llm = GatedLLM(reply=lambda _prompt: ANSWER)
    if policies:  # the output filter holds back at most a partial match: a word, not the answer
        settings = settings.model_copy(update={"policies_enabled": True, "policies_dir": ROOT / "policies"})
    async with serving(settings, llm) as port:
        text = await asyncio.wait_for(stream_chat(port, llm), HANG_GUARD_S)
    assert text == ANSWER
    assert llm.events == ["client: first text", "engine: last token"]
