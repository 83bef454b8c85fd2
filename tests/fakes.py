"""Fakes for unit tests: a byte-level tokenizer and an engine with vLLM's AsyncLLM surface.

They let the HTTP layer, policies and records be tested in milliseconds. They are
never used on a path a test claims to prove end to end (tests/e2e uses real vLLM).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
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
    # Merged-weights mode: the version whose weights are loaded (a reload of `<versions>/<v>/merged` loads v, of
    # any other directory `base`), the reloads asked for, weights paths whose reload fails (leaving the weights
    # corrupt, as a half-done reload would), pause state and prefix-cache resets.
    weights: str = "base"
    reloads: list[str] = field(default_factory=list)
    fail_reload: set[str] = field(default_factory=set)
    paused: bool = False
    prefix_resets: int = 0
    submit_delay: float = 0.0
    """Seconds a request takes to reach the engine (vLLM processes the input first): a pause sent meanwhile
    arrives before it, and holds it."""

    async def generate(
        self, prompt: dict[str, Any], params: Any, request_id: str, lora_request: Any = None, priority: int = 0
    ) -> AsyncIterator[FakeOutput]:
        text = bytes(i for i in prompt["prompt_token_ids"] if i < 256).decode(errors="replace")
        if self.submit_delay:
            await asyncio.sleep(self.submit_delay)
        while self.paused:  # held, as vLLM holds new requests while paused
            await asyncio.sleep(0.001)
        weights = self.weights
        if weights == "corrupt":  # vLLM: a step on half-reloaded (meta) parameters kills the engine core
            self.healthy = False
            raise RuntimeError("engine core died: weights on the meta device")
        self.seen.append(
            {
                "prompt": text,
                "input_type": prompt.get("type"),
                "params": params,
                "lora": lora_request,
                "request_id": request_id,
                "weights": weights,
            }
        )
        answer = self.reply(text) if self.reply else "echo: " + text.rsplit("<user>", 1)[-1].split("<")[0]
        if lora_request is not None:
            answer = f"[{lora_request.lora_name}] {answer}"
        elif weights != "base":
            answer = f"[{weights}] {answer}"  # merged weights answer as their adapter did
        data = answer.encode()[: params.max_tokens]
        # As vLLM: FINAL_ONLY (JSON requests) yields only the last output, each choice's whole text, token ids
        # and logprobs, all choices in it; DELTA (streams) yields each step's new token.
        final_only = getattr(params.output_kind, "name", None) == "FINAL_ONLY"
        self.running.add(request_id)
        try:
            for step in range(len(data)):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if self.weights != weights:
                    raise RuntimeError(f"weights changed from {weights} to {self.weights} under request {request_id}")
                last = step == len(data) - 1
                outs = []
                for i in range(params.n):
                    lp = (
                        [{data[step]: FakeLogprob(-0.5, 1, chr(data[step])), 32: FakeLogprob(-1.5, 2, " ")}]
                        if params.logprobs is not None
                        else None
                    )
                    finish = ("length" if len(data) == params.max_tokens else "stop") if last else None
                    if final_only:
                        whole = [{b: FakeLogprob(-0.5, 1, chr(b)), 32: FakeLogprob(-1.5, 2, " ")} for b in data]
                        lps = whole if params.logprobs is not None else None
                        outs.append(FakeCompletion(i, "".join(map(chr, data)), list(data), lps, finish))
                    else:
                        outs.append(FakeCompletion(i, chr(data[step]), [data[step]], lp, finish))
                if final_only and not last:
                    continue
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

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True) -> None:
        assert mode == "wait", mode
        self.paused = True
        while self.running:  # "wait": the running requests finish
            await asyncio.sleep(0.001)

    async def resume_generation(self) -> None:
        self.paused = False

    async def collective_rpc(
        self,
        method: str,
        timeout: float | None = None,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        assert method == "reload_weights" and kwargs is not None, (method, kwargs)
        assert self.paused, "weights reloaded while the engine runs"
        path = Path(kwargs["weights_path"])
        self.reloads.append(str(path))
        await asyncio.sleep(0.01)
        if str(path) in self.fail_reload:
            self.weights = "corrupt"
            raise RuntimeError(f"cannot load weights from {path}")
        self.weights = path.parent.name if path.name == "merged" else "base"

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        self.prefix_resets += 1
        return True

    def shutdown(self) -> None:
        pass


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


class FakeMergedWeights:
    """serve.weights.MergedWeights without torch: a "merge" makes the directory; `fail` names versions whose
    merge fails; a delta adapter has rank `delta_rank` (8: a version's own adapter, on the base)."""

    def __init__(self, store: Any, base_model: str) -> None:
        self.store, self.base_model = store, base_model
        self.fail: set[str] = set()
        self.merged: list[str] = []
        self.prepared: list[str] = []
        self.deltas: list[tuple[str, str]] = []
        self.delta_rank = 16

    def path(self, name: str) -> Path:
        return Path(self.base_model) if name == "base" else self.store.path(name) / "merged"

    async def ensure(self, name: str) -> Path:
        from core.merge import MergeError

        await asyncio.sleep(0.01)
        if name in self.fail:
            raise MergeError(f"merging version {name} failed (exit 1): broken adapter")
        path = self.path(name)
        path.mkdir(parents=True, exist_ok=True)
        self.merged.append(name)
        return path

    def prepare(self, name: str) -> None:
        self.prepared.append(name)

    async def delta(self, target: str, incumbent: str) -> Any:
        from core.merge import Delta

        self.deltas.append((target, incumbent))
        if incumbent == "base":
            return Delta(self.store.adapter_path(target), 8)
        path = self.store.path(incumbent if target == "base" else target) / f"delta-from-{incumbent}"
        path.mkdir(parents=True, exist_ok=True)
        return Delta(path, self.delta_rank)


def fake_engine(llm: FakeLLM, settings: Any, *, merged: bool = False) -> Any:
    """The real ModelEngine (versions, pinning, swaps) over a fake LLM and the byte tokenizer; `merged`: in
    merged-weights mode, over `FakeMergedWeights` (the engine's `weights_source`)."""
    from core.versions import VersionStore
    from serve.engine import ModelEngine

    store = VersionStore(settings.versions_dir)
    return ModelEngine(
        llm,
        ByteTokenizer(),
        model_name="demo",
        max_model_len=settings.max_model_len,
        store=store,
        lora_request_cls=FakeLoRARequest,
        weights=FakeMergedWeights(store, str(settings.var_dir / "base-model")) if merged else None,  # type: ignore[arg-type]
        max_lora_rank=16,
    )
