"""The Redis a `secondstage` command works on: resolved as every deployable does, its failure one line and exit 1.

    with command_redis(settings, console) as url:
        client = redis.Redis.from_url(url)
        ...

`resolve_redis` (core/redis_server.py) gives the configured `SECONDSTAGE_REDIS_URL`, or the private redis-server
under var/redis, started for the command if nothing runs it; that one is stopped again when the block ends. When
Redis cannot be had (serve is restarting its private server and it did not come back in time, say) the command
prints why in red and exits 1, without a traceback: it is the operator's to fix, not a bug.

Shared by the core's, serve's and align's commands; a module of its own rather than core/cli.py, whose import
mounts every side's commands (serve's and align's commands import this while the root CLI is being built).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from core.redis_server import RedisServerError, resolve_redis
from core.settings import CommonSettings


@contextlib.contextmanager
def command_redis(settings: CommonSettings, console: Console) -> Iterator[str]:
    """The Redis URL for the block; see the module docstring. Exits 1 (typer.Exit) when there is none."""
    try:
        url, child = resolve_redis(settings)
    except RedisServerError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    try:
        yield url
    finally:
        if child is not None:
            child.stop()
