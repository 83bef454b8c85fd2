"""The root `secondstage` command line: the commands of every package, mounted in one typer app.

secondstage serve                      # the API on 127.0.0.1:8000 (demo model unless --model)   [serve]
secondstage model demo                 # build the offline demo model into var/models/demo       [serve]
secondstage policy check | test TEXT   # validate rules, try them on text                        [serve]
secondstage align run [--every 30m]    # feedback -> LoRA version -> publish                     [align]
secondstage feedback export            # TRL datasets as JSONL                                   [align]
secondstage versions list | activate V # what exists, and rollback/roll forward (also to `base`)  [core]

The core owns the root app and the `versions` commands (the registry is core's). serve and align
add theirs through the `secondstage.commands` entry-point group declared in pyproject.toml: each
names a `register(app)` function. The core therefore never imports serve or align (import-linter
checks it), and a deployment that installs only one side gets only that side's commands.
"""

from __future__ import annotations

import datetime as dt
import os
from importlib.metadata import entry_points
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="secondstage: serve a model, enforce rules, learn from users.", no_args_is_help=True)
versions_app = typer.Typer(help="Model versions (LoRA adapters) and the active one.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
console = Console()

COMMANDS_GROUP = "secondstage.commands"


def mount_commands(root: typer.Typer) -> list[str]:
    """Let every installed package that declares a `secondstage.commands` entry point add its commands."""
    mounted = []
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(root)
        mounted.append(ep.name)
    return mounted


def _registry():  # type: ignore[no-untyped-def]
    import redis

    from core.keys import Keys
    from core.redis_server import RedisServerError, resolve_redis
    from core.settings import CommonSettings
    from core.versions import Registry, VersionStore

    settings = CommonSettings()
    try:
        url, child = resolve_redis(settings)
    except RedisServerError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    return Registry(redis.Redis.from_url(url), Keys(settings.redis_prefix)), VersionStore(settings.versions_dir), child


@versions_app.command("list")
def versions_list() -> None:
    """List model versions, their lineage and metrics; mark the active one."""
    from core.versions import BASE

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
    from core.versions import VersionError

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


mount_commands(app)

if __name__ == "__main__":  # `python -m core.cli`; vLLM spawns processes, so the guard matters
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
