"""serve's commands, mounted into the root `secondstage` CLI (core/cli.py) by `register`.

secondstage serve                      # the API on 127.0.0.1:8000 (demo model unless --model)
secondstage serve -tp 2 --no-enforce-eager --log-format json   # vLLM's engine arguments; JSON logs
secondstage serve --merged-weights     # the promoted version as merged full weights (base-model speed)
secondstage model demo                 # build the offline demo model into var/models/demo
secondstage policy check | test TEXT   # validate rules, try them on text
secondstage keys create | list | revoke  # API keys (serve/auth/cli.py)
secondstage data replay-spool --replica NAME   # write a dead replica's spooled records to Redis
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

# Imported here, not in `serve`: the root CLI's environment check must know serve's settings names before any
# command runs (core/cli.py).
from serve.settings import ServeSettings

UVICORN_OPTIONS: dict[str, Any] = {
    # uvloop when installed (vLLM installs it), else asyncio's own; the HTTP parser is httptools when installed.
    # uvloop costs the API process 5-10% less CPU per request and per chunk than asyncio's loop (bench/api_cost.py,
    # docs/performance.md). An earlier choice of asyncio rested on streams that seemed to reach a client all at
    # once under uvloop; that was the benchmark's client starved of CPU (docs/performance.md: TTFT), not the loop.
    "loop": "auto",
    "http": "auto",
}
"""uvicorn's event loop and HTTP implementation for `secondstage serve`; bench/api_cost.py runs the same."""

model_app = typer.Typer(help="Base models.", no_args_is_help=True)
console = Console()


def register(root: typer.Typer) -> None:
    """Entry point (`secondstage.commands`): add `serve`, `model`, `policy` and `keys` to the root CLI."""
    from serve.auth.cli import keys_app
    from serve.policy.cli import policy_app

    root.command("serve")(serve)
    root.add_typer(model_app, name="model")
    root.add_typer(policy_app, name="policy")
    root.add_typer(keys_app, name="keys")
    # Beside the core's `data purge`: the group is the core's, the command serve's (the spool is the log writer's).
    data = next((g.typer_instance for g in root.registered_groups if g.name == "data"), None)
    if data is not None:
        data.command("replay-spool")(replay_spool)


def serve(
    model: Annotated[str | None, typer.Option(help="HF model directory or hub id (default: the demo model).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: a private redis-server).")] = None,
    allow_anonymous: Annotated[
        bool, typer.Option(help="On a non-loopback bind with no API keys, serve chat and feedback without keys.")
    ] = False,
    admin_port: Annotated[
        int | None, typer.Option(help="Serve /admin/* and /metrics only on this port (404 on the public one).")
    ] = None,
    tensor_parallel_size: Annotated[
        int | None, typer.Option("--tensor-parallel-size", "-tp", min=1, help="GPUs each layer is split across.")
    ] = None,
    pipeline_parallel_size: Annotated[
        int | None, typer.Option("--pipeline-parallel-size", "-pp", min=1, help="Pipeline stages.")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Weights dtype (auto, float32, bfloat16, float16).")] = None,
    max_model_len: Annotated[
        int | None, typer.Option(min=1, help="Context length, prompt + completion (default 1024).")
    ] = None,
    kv_cache_memory_fraction: Annotated[
        float | None,
        typer.Option(
            "--kv-cache-memory-fraction",
            "--gpu-memory-utilization",
            min=0.0,
            max=1.0,
            help="Share of GPU memory (CPU: host RAM) vLLM reserves for weights and KV cache (default 0.2).",
        ),
    ] = None,
    max_loras: Annotated[int | None, typer.Option(min=1, help="LoRA versions resident in one batch.")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="Largest LoRA rank a version may have.")] = None,
    enforce_eager: Annotated[
        bool | None,
        typer.Option(help="Skip CUDA graphs (default: on for CPU, off with a GPU)."),
    ] = None,
    enable_prefix_caching: Annotated[
        bool | None, typer.Option(help="Reuse KV cache across shared prompt prefixes (default: vLLM's).")
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(min=1, help="KV-cache block size in tokens (default: 32 on CPU, vLLM's with a GPU)."),
    ] = None,
    merged_weights: Annotated[
        bool | None,
        typer.Option(
            help="Serve the promoted version as merged full weights (base-model speed; swaps reload the weights, "
            "canaries stay LoRA). Default: off (SECONDSTAGE_MERGED_WEIGHTS)."
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: Annotated[
        str | None, typer.Option(help="text or json (one object per line, for log shippers).")
    ] = None,
) -> None:
    """Run the OpenAI-compatible API with vLLM in-process."""
    import logging.config
    import os

    import uvicorn

    from serve.app import build_app
    from serve.logs import logging_config, vllm_logging_env

    given = {
        "model": model,
        "host": host,
        "port": port,
        "redis_url": redis_url,
        "allow_anonymous": allow_anonymous or None,  # the flag can turn it on; off leaves the environment's value
        "admin_port": admin_port,
        "tensor_parallel_size": tensor_parallel_size,
        "pipeline_parallel_size": pipeline_parallel_size,
        "dtype": dtype,
        "max_model_len": max_model_len,
        "kv_cache_memory_fraction": kv_cache_memory_fraction,
        "max_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "enforce_eager": enforce_eager,
        "enable_prefix_caching": enable_prefix_caching,
        "block_size": block_size,
        "merged_weights": merged_weights,
        "log_format": log_format,
    }
    # Flags override the environment; flags not given leave it alone.
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = ServeSettings(**overrides)  # type: ignore[arg-type]
    config = logging_config(log_level, settings.log_format)
    logging.config.dictConfig(config)
    if settings.log_format == "json" and "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
        # vLLM's own lines (and its engine processes') in the same JSON; an operator's own vLLM config wins.
        os.environ.update(vllm_logging_env(config, settings.var_dir / "logging.json"))
    if settings.model is None:
        from serve.demo.build import ensure_demo_model

        ensure_demo_model(settings.demo_model_dir)
    uvicorn.run(
        build_app(settings, own_process=True),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        log_config=config,
        access_log=False,  # serve/logs.py writes the access lines (with request id, version and latency)
        **UVICORN_OPTIONS,
    )


@model_app.command("demo")
def model_demo(
    out: Annotated[Path | None, typer.Option(help="Where to write it (default var/models/demo).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed (the build is deterministic).")] = 0,
) -> None:
    """Build the small offline demo chat model (tokenizer + Llama + supervised pass)."""
    from core.settings import CommonSettings
    from serve.demo.build import build_demo_model

    target = out or CommonSettings().demo_model_dir
    if (target / "config.json").is_file() and not force:
        console.print(f"demo model already at {target} (use --force to rebuild)")
        return
    path = build_demo_model(target, seed=seed)
    console.print(f"[green]demo model written to {path}[/]")


def replay_spool(
    replica: Annotated[
        str | None, typer.Option(help="The replica whose spool to replay: var/spool/<replica>/ (its pod name).")
    ] = None,
    spool_dir: Annotated[
        Path | None, typer.Option("--dir", help="A spool directory elsewhere (e.g. var/spool/ of older versions).")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="Give up after this many seconds if Redis does not take them.")] = 60,
) -> None:
    """Write the records a replica that is gone left in its log spool to Redis; without options, list the spools.

    A replica replays its own spool when it starts; this is for one that will not come back under its name
    (scaled down, renamed). It refuses a spool that a running replica holds.
    """
    import asyncio

    from core.cli_redis import command_redis

    settings = ServeSettings()
    root = settings.var_dir / "spool"
    if replica is None and spool_dir is None:
        spools = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for path in spools:
            files = [f for f in path.glob("*.jsonl") if f.name != "rejected.jsonl"]
            size = sum(f.stat().st_size for f in files)
            console.print(f"{path.name}\t{size} bytes waiting\t{path}")
        if not spools:
            console.print(f"no replica spools under {root}")
        return
    if replica is not None and spool_dir is not None:
        console.print("[red]--replica and --dir name the same thing; give one[/]")
        raise typer.Exit(2)
    if replica is not None:
        directory = root / replica
    else:
        assert spool_dir is not None
        directory = spool_dir
    if not directory.is_dir():
        console.print(f"[red]no spool directory {directory}[/] (`secondstage data replay-spool` lists them)")
        raise typer.Exit(1)
    with command_redis(settings, console) as url:
        try:
            left = asyncio.run(_replay(url, directory, timeout_s))
        except RuntimeError as exc:  # the spool's lock: a running replica replays its own
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(1) from exc
    if left:
        console.print(f"[red]{left} records still in {directory}: Redis did not take them within {timeout_s:.0f}s[/]")
        raise typer.Exit(1)
    console.print(f"[green]spool {directory} replayed into Redis[/]")


async def _replay(url: str, directory: Path, timeout_s: float) -> int:
    """Replay a spool directory with a LogWriter of its own (it locks the directory); records left after timeout_s."""
    import asyncio
    import time

    import redis.asyncio as aioredis
    from prometheus_client import CollectorRegistry

    from serve.logwriter import LogWriter

    writer = LogWriter(lambda: aioredis.Redis.from_url(url), directory, registry=CollectorRegistry())
    await writer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while writer.spool_records and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await writer.stop()
    return writer.spool_records
