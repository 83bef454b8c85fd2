"""The root `secondstage` command line: the commands of every package, mounted in one typer app.

secondstage serve                      # the API on 127.0.0.1:8000 (demo model unless --model)   [serve]
secondstage model demo                 # build the offline demo model into var/models/demo       [serve]
secondstage policy check | test TEXT   # validate rules, try them on text                        [serve]
secondstage align run [--every 30m]    # feedback -> LoRA version -> publish                     [align]
secondstage feedback export            # TRL datasets as JSONL                                   [align]
secondstage versions list | activate V # what exists, and rollback/roll forward (also to `base`)  [core]
secondstage versions canary V | promote [V] | rollback   # canary rollouts by hand (core/canary.py) [core]
secondstage versions show V [--json]   # lineage, datasets, metrics and the gate report of V     [core]
secondstage versions merge V           # V merged into full weights, for serve --merged-weights   [core]
secondstage data purge --key ID | --user ID [--dry-run]   # delete a person's records            [core]

The core owns the root app, the `versions` commands (the registry is core's) and `data purge`
(it works on core's records and registry). serve and align
add theirs through the `secondstage.commands` entry-point group declared in pyproject.toml: each
names a `register(app)` function. The core therefore never imports serve or align (import-linter
checks it), and a deployment that installs only one side gets only that side's commands.

Before any command runs, the root checks the environment: a `SECONDSTAGE_*` variable that no installed
side's settings read is reported by name with the closest known one (`--strict-env` or
SECONDSTAGE_STRICT_ENV=true: refused, exit 2). Each side's `register` module imports its settings class,
so the check knows every installed side's names, whichever command runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="secondstage: serve a model, enforce rules, learn from users.", no_args_is_help=True)
versions_app = typer.Typer(help="Model versions (LoRA adapters) and the active one.", no_args_is_help=True)
app.add_typer(versions_app, name="versions")
data_app = typer.Typer(help="Stored data: delete a person's records.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

if TYPE_CHECKING:
    from core.versions import Manifest, VersionStore

COMMANDS_GROUP = "secondstage.commands"


@app.callback()
def _root(
    strict_env: Annotated[
        bool | None,
        typer.Option(
            "--strict-env/--no-strict-env",
            help="Refuse to run when a SECONDSTAGE_* variable is not a known setting (default: warn; "
            "SECONDSTAGE_STRICT_ENV).",
        ),
    ] = None,
) -> None:
    """secondstage: serve a model, enforce rules, learn from users."""
    from core.settings import UnknownSettingError, check_environment

    # Logging is not configured yet (serve does it later): the warnings reach stderr through logging's last resort.
    try:
        check_environment(strict=strict_env)
    except UnknownSettingError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc


def mount_commands(root: typer.Typer) -> list[str]:
    """Let every installed package that declares a `secondstage.commands` entry point add its commands."""
    mounted = []
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(root)
        mounted.append(ep.name)
    return mounted


@contextlib.contextmanager
def _registry():  # type: ignore[no-untyped-def]
    """(Registry, VersionStore) on the configured Redis for the block; exit 1 if there is none (core/cli_redis.py)."""
    import redis

    from core.cli_redis import command_redis
    from core.keys import Keys
    from core.settings import CommonSettings
    from core.versions import Registry, VersionStore

    settings = CommonSettings()
    with command_redis(settings, console) as url:
        client = redis.Redis.from_url(url)
        try:
            yield Registry(client, Keys(settings.redis_prefix)), VersionStore(settings.versions_dir)
        finally:
            client.close()


@versions_app.command("list")
def versions_list() -> None:
    """List model versions, their lineage and metrics; mark the incumbent (`*`) and a running canary."""
    from core.canary import Rollout
    from core.versions import BASE

    with _registry() as (registry, store):
        active = registry.active()
        canary = Rollout(registry.client, registry.keys).state()

        def role(name: str) -> str:
            # `*` kept for the incumbent (the promoted version), as before canaries existed.
            if name == active:
                return "* incumbent" if canary is not None else "*"
            if canary is not None and name == canary.version:
                return f"canary {canary.share:.0%}"
            return ""

        table = Table("", "version", "parent", "created", "feedback", "datasets", "metrics")
        table.add_row(role(BASE), BASE, "", "", "", "", "the base model, no adapter")
        for name, m in registry.manifests().items():
            created = dt.datetime.fromtimestamp(m.created).strftime("%Y-%m-%d %H:%M:%S")
            metrics = ", ".join(f"{k}={v:.3g}" for k, v in list(m.metrics.items())[:4])
            datasets = ", ".join(f"{k}={v}" for k, v in m.datasets.items())
            on_disk = "" if store.path(name).is_dir() else " [red](missing on disk)[/]"
            table.add_row(
                role(name),
                name + on_disk,
                m.parent,
                created,
                str(len(m.feedback_ids)),
                datasets,
                metrics,
            )
        console.print(table)


def _lineage(version: str, manifests: dict[str, Manifest], store: VersionStore) -> list[str]:
    """`version`, its parent, …, down to `base` (or to the first version whose manifest is missing: `?`)."""
    from core.records import BASE
    from core.versions import VersionError

    chain = [version]
    while chain[-1] != BASE:
        name = chain[-1]
        m = manifests.get(name)
        if m is None:
            try:
                m = store.manifest(name)
            except VersionError:
                chain.append("?")
                break
        if m.parent in chain:  # a corrupt registry must not loop forever
            chain.append(f"{m.parent} (cycle)")
            break
        chain.append(m.parent)
    return chain


def _gate_rows(gate: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(check, passed, value, threshold, note) per gate check, as text."""
    rows = []
    for name, check in (gate.get("checks") or {}).items():
        threshold = check.get("threshold")
        bound = {"min": "≥ ", "max": "≤ "}.get(str(check.get("bound")), "")
        rows.append(
            (
                name,
                "pass" if check.get("passed") else "FAIL",
                str(check.get("value")),
                "" if threshold is None else f"{bound}{threshold}",
                str(check.get("note", "")),
            )
        )
    return rows


@versions_app.command("show")
def versions_show(
    version: Annotated[str, typer.Argument(help="A version name (v<N>).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest and lineage as one JSON object.")] = False,
) -> None:
    """Show VERSION: lineage (parent chain to base), created, datasets, metrics and the gate report."""
    import json

    import msgspec

    from core.versions import VersionError, check_name

    try:
        check_name(version)
    except VersionError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from exc
    with _registry() as (registry, store):
        manifests = registry.manifests()
        active = registry.active()
        manifest = manifests.get(version)
        if manifest is None:
            try:
                manifest = store.manifest(version)
            except VersionError as exc:
                known = ", ".join(manifests) or "none"
                console.print(f"[red]unknown version {version!r} (registered: {known}); {exc}[/]")
                raise typer.Exit(2) from exc
        lineage = _lineage(version, manifests, store)
    if as_json:
        out = {**msgspec.to_builtins(manifest), "lineage": lineage, "active": version == active}
        typer.echo(json.dumps(out, indent=2, default=str))
        return
    created = dt.datetime.fromtimestamp(manifest.created).strftime("%Y-%m-%d %H:%M:%S")
    console.print(f"[bold]{version}[/]" + (" [green](active)[/]" if version == active else ""))
    console.print(f"lineage:  {' → '.join(lineage)}")
    console.print(f"created:  {created}    base model: {manifest.base_model}    LoRA rank: {manifest.lora_rank}")
    console.print(f"feedback: {len(manifest.feedback_ids)} trained, "
                  f"{len(manifest.gate.get('heldout_feedback_ids') or [])} held out; "
                  f"{len(manifest.policy_pair_ids)} policy pairs")  # fmt: skip
    console.print(f"datasets: {', '.join(f'{k}={v}' for k, v in manifest.datasets.items()) or '-'}")
    console.print(f"metrics:  {', '.join(f'{k}={v:.4g}' for k, v in manifest.metrics.items()) or '-'}")
    gate = manifest.gate or {}
    verdict = "skipped" if gate.get("skipped") else ("passed" if gate.get("passed") else "failed")
    table = Table("check", "result", "value", "threshold", "note", title=f"gate: {verdict}", title_justify="left")
    for row in _gate_rows(gate):
        table.add_row(*row)
    console.print(table)


@versions_app.command("activate")
def versions_activate(version: Annotated[str, typer.Argument(help="A version name, or `base`.")]) -> None:
    """Make VERSION the one running servers use for new requests (rollback = an older one)."""
    from core.versions import VersionError

    with _registry() as (registry, _):
        try:
            registry.activate(version)
        except VersionError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc
    console.print(f"[green]active version: {version}[/] (running servers switch within seconds)")


def _rollout_command(action: str, **kw: object) -> dict[str, object]:
    """Run one `core.canary.Rollout` transition from the CLI; a refusal exits 2 with Redis' reason."""
    from core.canary import CanaryError, Rollout

    with _registry() as (registry, _):
        try:
            return getattr(Rollout(registry.client, registry.keys), action)(**kw)  # type: ignore[no-any-return]
        except CanaryError as exc:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from exc


@versions_app.command("canary")
def versions_canary(
    version: Annotated[str, typer.Argument(help="A registered version.")],
    share: Annotated[
        float | None, typer.Option(help="Share of callers it serves (default SECONDSTAGE_CANARY_SHARE).")
    ] = None,
) -> None:
    """Start VERSION as a canary beside the incumbent (a running canary is superseded)."""
    from core.settings import CommonSettings

    share = CommonSettings().canary_share if share is None else share
    event = _rollout_command("start", version=version, share=share, trigger="operator", reason="started by hand")
    console.print(
        f"[green]canary {version} serves {share:.0%} of callers beside {event['incumbent']}[/] (run {event['run']}); "
        "serve promotes or rolls it back on live signals, or `secondstage versions promote|rollback`"
    )


@versions_app.command("promote")
def versions_promote(
    version: Annotated[
        str | None, typer.Argument(help="The running canary (a guard: refused if another one runs).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Recorded with the decision.")] = "promoted by hand",
) -> None:
    """Promote the running canary now: it becomes the incumbent and serves everyone."""
    event = _rollout_command("promote", version=version, trigger="operator", reason=reason)
    console.print(
        f"[green]promoted {event['version']}[/] (was {event['incumbent']}); running servers follow within seconds"
    )


@versions_app.command("rollback")
def versions_rollback(
    reason: Annotated[str, typer.Option(help="Recorded with the decision.")] = "rolled back by hand",
) -> None:
    """Roll the running canary back now: the incumbent serves everyone again."""
    event = _rollout_command("rollback", trigger="operator", reason=reason)
    console.print(f"[green]rolled back {event['version']}[/]; {event['incumbent']} serves everyone")


@versions_app.command("merge")
def versions_merge(
    version: Annotated[str, typer.Argument(help="A version name (v<N>).")],
) -> None:
    """Merge VERSION's adapter into full weights (versions/<V>/merged/), ahead of serving with --merged-weights.

    A replica in merged-weights mode merges a version itself when it first needs it; merging ahead makes
    its swap only a reload. Reads the disk only (no Redis); the base model is SECONDSTAGE_MODEL (or the demo).
    """
    import time

    from core.merge import MergeError, merge_adapter, merged_path
    from core.settings import CommonSettings
    from core.versions import VersionError, VersionStore

    settings = CommonSettings()
    store = VersionStore(settings.versions_dir)
    start = time.perf_counter()
    try:
        manifest = store.manifest(version)
        out = merge_adapter(settings.model_path, store.adapter_path(manifest.version), merged_path(store, version))
    except MergeError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    except VersionError as exc:
        console.print(f"[red]{exc}[/] (`secondstage versions list` shows the versions)")
        raise typer.Exit(1) from exc
    console.print(f"[green]{version} merged[/] into {out} ({time.perf_counter() - start:.1f}s)")


@data_app.command("purge")
def data_purge(
    key: Annotated[str | None, typer.Option(help="An API key id (the `key` field of its records).")] = None,
    user: Annotated[str | None, typer.Option(help="A user id (the `user` field of completions and feedback).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")] = False,
) -> None:
    """Delete an identity's completions, feedback and policy pairs; name the versions that trained on them."""
    from core.purge import purge

    if (key is None) == (user is None):
        console.print("[red]give exactly one of --key ID and --user ID[/]")
        raise typer.Exit(2)
    with _registry() as (registry, store):
        report = purge(registry.client, registry.keys, store, key=key, user=user, dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    who = f"key {key}" if key is not None else f"user {user}"
    console.print(
        f"{who}: {verb} {len(report.completion_ids)} completions, {len(report.feedback_ids)} feedback, "
        f"{len(report.policy_pair_ids)} policy pairs ({report.stream_entries} stream entries, "
        f"{report.lookup_keys} lookup keys)"
    )
    for cid in report.completion_ids:
        console.print(f"  completion {cid}")
    for fid in report.feedback_ids:
        console.print(f"  feedback {fid}")
    for pid in report.policy_pair_ids:
        console.print(f"  policy pair {pid}")
    if report.versions:
        console.print("[yellow]versions trained on this data (retrain without it, then roll back or delete them):[/]")
        for name, ids in report.versions.items():
            console.print(f"  {name}: {', '.join(ids)}")
    else:
        console.print("no version trained on this data")


mount_commands(app)

if __name__ == "__main__":  # `python -m core.cli`; vLLM spawns processes, so the guard matters
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
