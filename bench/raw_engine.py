"""The raw engine: vLLM's `AsyncLLM` with secondstage's own engine settings, driven in-process with no HTTP.

    .venv/bin/python -m bench.raw_engine SPEC.json OUT.json     # bench/serving.py starts it; not run by hand

The ceiling for any server over this engine. bench/serving.py starts this module as a fresh subprocess per
pass (as it starts every server fresh) with the environment it gives secondstage, so `ServeSettings()` reads
the same SECONDSTAGE_* values and `serve.engine.engine_kwargs` turns them into the very `AsyncEngineArgs`
secondstage passes. SPEC.json lists the cells (concurrency, prompts, max_tokens, stream or not, LoRA adapter)
in the order the servers run them; OUT.json gets one summary per cell, in the shape bench/serving.py reports
for the HTTP servers.

Why a subprocess and why the clients live on the engine's own event loop: `AsyncLLM` has no transport, so
its clients can only be coroutines in the process that owns it. Run inside the benchmark's process it would
share that process's interpreter and loop with the httpx load generator (idle during this run, but still
the process that spawned every server, with their log files and sockets): a fresh process starts the same
way each pass, and nothing else runs in it. Each client is a task that calls `generate()` and iterates its
outputs — the least any server must do. What the HTTP servers pay and this does not is the point of the
ceiling: HTTP parsing, JSON encoding, the chat template and tokenization (prompts are templated and tokenized
before the clock starts), policies, logging, and the load generator's own process competing for the CPUs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.harness import cpu_by_process
from bench.load import Sample, cpu_ms_per_request, summarise
from serve.placement import keep_off_workers


async def _one(llm: Any, ids: list[int], params: Any, lora: Any) -> Sample:
    from vllm.inputs import tokens_input

    t0 = time.perf_counter()
    ttft, tokens = None, 0
    delta = params.output_kind.name == "DELTA"
    try:
        # The rendered input secondstage and vLLM's server pass (a bare dict would be re-rendered in a thread pool).
        async for out in llm.generate(tokens_input(ids), params, uuid.uuid4().hex, lora_request=lora):
            completion = out.outputs[0]
            # DELTA outputs carry the new tokens only, FINAL_ONLY all of them once.
            tokens = tokens + len(completion.token_ids) if delta else len(completion.token_ids)
            if delta and ttft is None and completion.text:
                ttft = time.perf_counter() - t0
    except Exception as exc:  # a failed request is a data point, not the end of the run
        return Sample(False, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
    return Sample(True, time.perf_counter() - t0, ttft, tokens, len(ids))


async def _cell(
    llm: Any, cell: dict[str, Any], warmup: list[list[int]], prompts: list[list[int]], lora: Any
) -> dict[str, Any]:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    # DELTA is what secondstage asks for (and what a streaming server needs); a non-streaming server needs
    # only the final output, the cheapest kind.
    kind = RequestOutputKind.DELTA if cell["stream"] else RequestOutputKind.FINAL_ONLY
    params = SamplingParams(max_tokens=cell["max_tokens"], temperature=0.0, ignore_eos=True, output_kind=kind)
    warm = await asyncio.gather(*[_one(llm, ids, params, lora) for ids in warmup])
    if warm and not any(s.ok for s in warm):
        raise RuntimeError(f"every warm-up request failed; first: {warm[0].error}")
    samples: list[Sample] = []
    queue = list(reversed(prompts))

    async def client() -> None:
        while queue:
            samples.append(await _one(llm, queue.pop(), params, lora))

    cpu0 = cpu_by_process(os.getpid())
    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(cell["concurrency"])])
    wall = time.perf_counter() - t0
    s = summarise(samples, wall)
    # This process and its engine core: the CPU the ceiling used (there is no load generator process).
    used = {role: seconds - cpu0[role] for role, seconds in cpu_by_process(os.getpid()).items()}
    s["server_cores"] = sum(used.values()) / wall
    s["client_cores"] = 0.0
    s |= cpu_ms_per_request(used | {"load_generator": 0.0}, len(prompts))
    return s


def _tokens(tokenizer: Any, messages: list[str], system: str | None = None) -> list[list[int]]:
    """The chat template and tokenization, done off the clock: the ceiling is the engine alone. `system`: the
    system message the HTTP clients send too (bench/serving.py's equal prompts)."""
    out = []
    for content in messages:
        chat = [{"role": "user", "content": content}]
        if system is not None:
            chat.insert(0, {"role": "system", "content": system})
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    from serve.engine import engine_kwargs
    from serve.settings import ServeSettings

    settings = ServeSettings()
    t0 = time.monotonic()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(settings, cuda=current_platform.is_cuda_alike())))
    started = time.monotonic() - t0
    from vllm.utils.gc_utils import freeze_gc_heap

    freeze_gc_heap()  # as vLLM's server and secondstage serve do once started: no GC walks of the startup heap
    if settings.keep_off_worker_cpus:  # as secondstage serve does: this process and the engine core off them
        keep_off_workers()
    tokenizer = llm.get_tokenizer()
    out: dict[str, Any] = {"startup_s": started, "cells": {}}
    try:
        for cell in spec["cells"]:
            lora = None
            if cell.get("adapter"):
                lora = LoRARequest(lora_name="bench", lora_int_id=1, lora_path=cell["adapter"])
            system = spec.get("system")
            warm, prompts = _tokens(tokenizer, cell["warmup"], system), _tokens(tokenizer, cell["prompts"], system)
            s = await _cell(llm, cell, warm, prompts, lora)
            s["loadavg_1m_after"] = os.getloadavg()[0]
            out["cells"][cell["name"]] = s
            # Progress in the log (bench/serving.py prints the figures once the pass is over).
            print(f"{cell['name']}: {s['out_tok_per_s']:.1f} tok/s, {s['errors']} errors", flush=True)
    finally:
        llm.shutdown()
    return out


def main() -> None:
    spec_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    result = asyncio.run(run(json.loads(spec_path.read_text())))
    out_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
