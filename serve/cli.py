"""The `secondstage` command line: serve, align, model, policy, versions, feedback.

secondstage serve                      # the API on 127.0.0.1:8000 (demo model unless --model)
secondstage model demo                 # build the offline demo model into var/models/demo
secondstage align run [--every 30m]    # feedback -> LoRA version -> publish
secondstage versions list | activate V # what exists, and rollback/roll forward (also to `base`)
secondstage policy check | test TEXT   # validate rules, try them on text
secondstage feedback export            # TRL datasets as JSONL
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="secondstage: serve a model, enforce rules, learn from users.", no_args_is_help=True)
model_app = typer.Typer(help="Base models.", no_args_is_help=True)
versions_app = typer.Typer(help="Model versions (LoRA adapters) and the active one.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(versions_app, name="versions")
console = Console()


def _mount_subapps() -> None:
    # Each sub-app lives with its package; import errors surface when the command runs.
    from align.cli import align_app, feedback_app
    from serve.policy.cli import policy_app

    app.add_typer(align_app, name="align")
    app.add_typer(feedback_app, name="feedback")
    app.add_typer(policy_app, name="policy")


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="HF model directory or hub id (default: the demo model).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    redis_url: Annotated[str | None, typer.Option(help="Redis URL (default: a private redis-server).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the OpenAI-compatible API with vLLM in-process."""
    import uvicorn

    from serve.app import build_app
    from serve.settings import ServeSettings

    overrides = {k: v for k, v in {"model": model, "host": host, "port": port, "redis_url": redis_url}.items() if v}
    settings = ServeSettings(**overrides)  # type: ignore[arg-type]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.model is None:
        from serve.demo.build import ensure_demo_model

        ensure_demo_model(settings.demo_model_dir)
    uvicorn.run(build_app(settings), host=settings.host, port=settings.port, log_level=log_level)


@model_app.command("demo")
def model_demo(
    out: Annotated[Path | None, typer.Option(help="Where to write it (default var/models/demo).")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
    seed: Annotated[int, typer.Option(help="Seed (the build is deterministic).")] = 0,
) -> None:
    """Build the small offline demo chat model (tokenizer + Llama + supervised pass)."""
    from serve.demo.build import build_demo_model
    from serve.settings import CommonSettings

    target = out or CommonSettings().demo_model_dir
    if (target / "config.json").is_file() and not force:
        console.print(f"demo model already at {target} (use --force to rebuild)")
        return
    path = build_demo_model(target, seed=seed)
    console.print(f"[green]demo model written to {path}[/]")


def _registry():  # type: ignore[no-untyped-def]
    import redis

    from serve.keys import Keys
    from serve.redis_server import resolve_redis
    from serve.settings import CommonSettings
    from serve.versions import Registry, VersionStore

    settings = CommonSettings()
    url, child = resolve_redis(settings)
    return Registry(redis.Redis.from_url(url), Keys(settings.redis_prefix)), VersionStore(settings.versions_dir), child


@versions_app.command("list")
def versions_list() -> None:
    """List model versions, their lineage and metrics; mark the active one."""
    from serve.versions import BASE

    registry, store, child = _registry()
    try:
        active = registry.active()
        table = Table("", "version", "parent", "created", "feedback", "datasets", "metrics")
        table.add_row("*" if active == BASE else "", BASE, "", "", "", "", "the base model, no adapter")
        for name, m in registry.manifests().items():
            created = dt.datetime.fromtimestamp(m.created).strftime("%Y-%m-%d %H:%M:%S")
            metrics = ", ".join(f"{k}={v:.3g}" for k, v in list(m.metrics.items())[:4])
            datasets = ", ".join(f"{k}={v}" for k, v in m.datasets.items())
            on_disk = "" if store.path(name).is_dir() else " [red](missing on disk)[/]"
            table.add_row(
                "*" if name == active else "",
                name + on_disk,
                m.parent,
                created,
                str(len(m.feedback_ids)),
                datasets,
                metrics,
            )
        console.print(table)
    finally:
        if child is not None:
            child.stop()


@versions_app.command("activate")
def versions_activate(version: Annotated[str, typer.Argument(help="A version name, or `base`.")]) -> None:
    """Make VERSION the one running servers use for new requests (rollback = an older one)."""
    from serve.versions import VersionError

    registry, _, child = _registry()
    try:
        registry.activate(version)
    except VersionError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    finally:
        if child is not None:
            child.stop()
    console.print(f"[green]active version: {version}[/] (running servers switch within seconds)")


_mount_subapps()

if __name__ == "__main__":  # `python -m serve.cli`; vLLM spawns processes, so the guard matters
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
