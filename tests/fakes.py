"""Fakes for unit tests: a byte-level tokenizer and an engine with vLLM's AsyncLLM surface.

They let the HTTP layer, policies and records be tested in milliseconds. They are
never used on a path a test claims to prove end to end (tests/e2e uses real vLLM).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


class ByteTokenizer:
    """One token per byte, plus an end-of-turn token (256)."""

    eos_token_id = 256

    def __len__(self) -> int:
        return 257

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool, tokenize: bool) -> str:
        for m in messages:
            if m["role"] not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"bad role {m['role']}")
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


@dataclass
class FakeLogprob:
    logprob: float
    rank: int
    decoded_token: str


@dataclass
class FakeCompletion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, FakeLogprob]] | None = None
    finish_reason: str | None = None


@dataclass
class FakeOutput:
    request_id: str
    outputs: list[FakeCompletion]
    finished: bool


@dataclass
class FakeLLM:
    """Answers `reply(prompt)` (default: "echo: <last user text>"), one byte per step, per choice."""

    delay: float = 0.0
    reply: Any = None
    running: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    loras: dict[int, Any] = field(default_factory=dict)
    seen: list[dict[str, Any]] = field(default_factory=list)
    healthy: bool = True
    fail_lora: bool = False

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[FakeOutput]:
        text = bytes(i for i in prompt["prompt_token_ids"] if i < 256).decode(errors="replace")
        self.seen.append({"prompt": text, "params": params, "lora": lora_request, "request_id": request_id})
        answer = self.reply(text) if self.reply else "echo: " + text.rsplit("<user>", 1)[-1].split("<")[0]
        if lora_request is not None:
            answer = f"[{lora_request.lora_name}] {answer}"
        data = answer.encode()[: params.max_tokens]
        self.running.add(request_id)
        try:
            for step in range(len(data)):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                last = step == len(data) - 1
                outs = []
                for i in range(params.n):
                    lp = (
                        [{data[step]: FakeLogprob(-0.5, 1, chr(data[step])), 32: FakeLogprob(-1.5, 2, " ")}]
                        if params.logprobs is not None
                        else None
                    )
                    finish = ("length" if len(data) == params.max_tokens else "stop") if last else None
                    outs.append(FakeCompletion(i, chr(data[step]), [data[step]], lp, finish))
                yield FakeOutput(request_id, outs, last)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id: str | list[str]) -> None:
        self.aborted.append(str(request_id))

    async def add_lora(self, lora_request: Any) -> bool:
        if self.fail_lora:
            raise RuntimeError("broken adapter")
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return self.loras.pop(lora_id, None) is not None

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("engine dead")

    def shutdown(self) -> None:
        pass


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


def fake_engine(llm: FakeLLM, settings: Any) -> Any:
    """The real ModelEngine (versions, pinning, swaps) over a fake LLM and the byte tokenizer."""
    from core.versions import VersionStore
    from serve.engine import ModelEngine

    return ModelEngine(
        llm,
        ByteTokenizer(),
        model_name="demo",
        max_model_len=settings.max_model_len,
        store=VersionStore(settings.versions_dir),
        lora_request_cls=FakeLoRARequest,
    )
