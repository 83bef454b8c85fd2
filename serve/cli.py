"""serve's commands, mounted into the root `secondstage` CLI (core/cli.py) by `register`.

secondstage serve                      # the API on 127.0.0.1:8000 (demo model unless --model)
secondstage model demo                 # build the offline demo model into var/models/demo
secondstage policy check | test TEXT   # validate rules, try them on text
secondstage keys create | list | revoke  # API keys (serve/auth/cli.py)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the OpenAI-compatible API with vLLM in-process."""
    import uvicorn

    from serve.app import build_app
    from serve.settings import ServeSettings

    given = {
        "model": model,
        "host": host,
        "port": port,
        "redis_url": redis_url,
        "allow_anonymous": allow_anonymous,
        "admin_port": admin_port,
    }
    overrides = {k: v for k, v in given.items() if v}
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
    from core.settings import CommonSettings
    from serve.demo.build import build_demo_model

    target = out or CommonSettings().demo_model_dir
    if (target / "config.json").is_file() and not force:
        console.print(f"demo model already at {target} (use --force to rebuild)")
        return
    path = build_demo_model(target, seed=seed)
    console.print(f"[green]demo model written to {path}[/]")
