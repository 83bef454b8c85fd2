"""align's commands, mounted into the root `secondstage` CLI (core/cli.py) by `register`.

secondstage align run                  # one run: new feedback → LoRA version → publish
secondstage align run --every 30m      # repeat every 30 minutes (s, m, h, d; combinable: 1h30m)
secondstage align run --all            # train on all feedback ever logged, not only the unused
secondstage align run --dry-run        # say what would be trained; change nothing
    exit status: 0 published / nothing to do, 1 failed, 2 usage, 3 gate refused, 75 lock held (align/job.py)
secondstage feedback export --out DIR  # dpo.jsonl + kto.jsonl (TRL conversational rows), no training
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from align.settings import AlignSettings

align_app = typer.Typer(help="Turn feedback into new model versions (TRL + LoRA).", no_args_is_help=True)
feedback_app = typer.Typer(help="Logged user feedback.", no_args_is_help=True)


def register(root: typer.Typer) -> None:
    """Entry point (`secondstage.commands`): add `align` and `feedback` to the root CLI."""
    root.add_typer(align_app, name="align")
    root.add_typer(feedback_app, name="feedback")


@align_app.callback()
def _align() -> None:
    """Turn feedback into new model versions (TRL + LoRA)."""
    # A callback keeps `run` a subcommand even while it is the only one (typer collapses one-command apps).


@feedback_app.callback()
def _feedback() -> None:
    """Logged user feedback."""


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds in `text`: '90' (seconds), '30s', '10m', '2h', '1d', '1h30m'. Raises ValueError naming the input."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", t):
        seconds = float(t)
    else:
        parts = _PART.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"cannot read duration {text!r}: use a number with a unit, like 30s, 10m, 2h or 1h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def _settings(**overrides: Any) -> AlignSettings:
    # Flags override the environment; unset flags leave it alone.
    return AlignSettings(**{k: v for k, v in overrides.items() if v is not None})


@align_app.command("run")
def run(
    every: Annotated[
        str | None, typer.Option("--every", help="Repeat at this interval (30s, 10m, 2h); default: run once.")
    ] = None,
    all_feedback: Annotated[
        bool, typer.Option("--all", help="Train on all logged feedback, not only what earlier runs did not use.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read and count feedback; train and publish nothing.")] = (
        False
    ),
    min_feedback: Annotated[
        int | None, typer.Option("--min-feedback", min=1, help="Fewest usable rows worth a run (default 4).")
    ] = None,
) -> None:
    """Train a LoRA version from new feedback, gate it, and publish it to the running servers.

    Exit status of one run (a scheduler should retry only 1):
    0 published, nothing to do, or a dry run;
    1 the run failed (Redis, disk, training): a retry may help;
    2 usage (a flag or its value);
    3 the gate refused the adapter;
    75 another run holds the lock.
    """
    from align.job import AlignError, run_every, run_once
    from align.train import TrainError

    console = Console(stderr=True)
    settings = _settings(min_feedback=min_feedback)
    try:
        if every is None:
            result = run_once(settings, all_feedback=all_feedback, dry_run=dry_run, console=console)
            raise typer.Exit(result.exit_code)
        try:
            interval = parse_duration(every)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--every") from e
        console.print(f"running every {every} ({interval:.0f}s); Ctrl-C to stop")
        try:
            run_every(settings, interval, all_feedback=all_feedback, dry_run=dry_run, console=console)
        except KeyboardInterrupt:
            console.print("stopped")
    except (AlignError, TrainError) as e:
        console.print(f"[red]align run failed: {e}")
        raise typer.Exit(1) from e


@feedback_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for dpo.jsonl and kto.jsonl.")] = Path(
        "var/feedback-export"
    ),
    all_feedback: Annotated[
        bool, typer.Option("--all", help="Export all logged feedback, not only what align has not used yet.")
    ] = False,
) -> None:
    """Write the DPO and KTO datasets align would train on, as JSONL, without training or consuming anything."""
    from align.datasets import build_datasets, export_jsonl
    from align.feedback import FeedbackReader
    from align.job import open_redis
    from core.keys import Keys

    console = Console(stderr=True)
    settings = AlignSettings()  # type: ignore[call-arg]  # every field has a default; mypy can't see pydantic's
    with open_redis(settings) as client:
        reader = FeedbackReader(
            client,
            Keys(settings.redis_prefix),
            consumer=settings.consumer_name,
            max_rows_per_user=settings.max_rows_per_user,
            include_policy_pairs=settings.include_policy_pairs,
        )
        data = build_datasets(reader.read(all_feedback=all_feedback, consume=False))
    paths = export_jsonl(data, out)
    for name, path in paths.items():
        console.print(f"{name}: {len(data.dpo_rows if name == 'dpo' else data.kto_rows)} rows → {path}")
    console.print(f"counts: {data.summary()}")
