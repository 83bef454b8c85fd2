"""`secondstage keys`: create, list and revoke API keys (serve's commands, mounted by serve/cli.py).

secondstage keys create --name app --scopes chat,feedback   # [--rpm --tpm --feedback-per-min --max-concurrency]
secondstage keys list                  # ids, names, scopes, limits, created, revoked; never a secret
secondstage keys revoke ID             # refused on every replica within SECONDSTAGE_AUTH_CACHE_S

They find Redis like every other command: SECONDSTAGE_REDIS_URL, else the private redis-server under var/.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from serve.auth.store import KeyStore, KeyStoreError
from serve.caller import SCOPES, KeyLimits

keys_app = typer.Typer(help="API keys: who may chat, give feedback, administer.", no_args_is_help=True)
console = Console()
T = TypeVar("T")


def _run(action: Callable[[KeyStore], Awaitable[T]]) -> T:
    """Run `action` on the key store of the configured Redis (starting the private one if needed)."""
    import redis.asyncio as aioredis

    from core.cli_redis import command_redis
    from core.keys import Keys
    from core.settings import CommonSettings

    settings = CommonSettings()

    async def go(url: str) -> T:
        client = aioredis.Redis.from_url(url)
        try:
            return await action(KeyStore(client, Keys(settings.redis_prefix)))
        finally:
            await client.aclose()

    with command_redis(settings, console) as url:
        try:
            return asyncio.run(go(url))
        except KeyStoreError as exc:
            console.print(f"[red]{exc}[/]", highlight=False)
            raise typer.Exit(2) from exc


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for; policy `users` globs match it.")],
    scopes: Annotated[str, typer.Option(help=f"Comma-separated: {','.join(SCOPES)}.")] = "chat,feedback",
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    feedback_per_min: Annotated[int | None, typer.Option(help="Feedback events per minute.")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Requests in flight at once.")] = None,
) -> None:
    """Create a key and print it once: only its hash is stored, so it cannot be shown again."""
    limits = KeyLimits(rpm=rpm, tpm=tpm, feedback_per_min=feedback_per_min, max_concurrency=max_concurrency)
    secret, entry = _run(lambda store: store.create(name, scopes.split(","), limits))
    console.print(f"created key {entry.id} ({entry.name}; scopes {','.join(entry.scopes)})", highlight=False)
    console.print("the key (shown once; store it now):", highlight=False)
    # Plain print: the secret alone on its line, without rich wrapping it, so `| tail -1` captures it.
    print(secret)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (ids, names, scopes, limits, state); never the secret, which is not stored."""
    entries = _run(lambda store: store.list())
    table = Table("id", "name", "scopes", "limits", "created", "state")
    for e in entries:
        limits = ", ".join(f"{k}={v}" for k, v in _limits(e.limits).items()) or "-"
        created = dt.datetime.fromtimestamp(e.created).strftime("%Y-%m-%d %H:%M:%S")
        state = "revoked" if e.revoked else "active"
        table.add_row(
            e.id, e.name + (" (var/admin.key)" if e.local_admin else ""), ",".join(e.scopes), limits, created, state
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id, as `keys list` shows it.")]) -> None:
    """Revoke a key: every replica refuses it within SECONDSTAGE_AUTH_CACHE_S (2 s by default)."""
    entry = _run(lambda store: store.revoke(key_id))
    console.print(f"revoked key {entry.id} ({entry.name}); servers refuse it within seconds", highlight=False)


def _limits(limits: KeyLimits) -> dict[str, int]:
    return {f: v for f in KeyLimits.__struct_fields__ if (v := getattr(limits, f)) is not None}
