"""align's commands, mounted into the root `secondstage` CLI (core/cli.py) by `register`.

secondstage align run                  # one run: new feedback → LoRA version → publish
secondstage align run --every 30m      # repeat every 30 minutes (s, m, h, d; combinable: 1h30m)
secondstage align run --all            # train on all feedback ever logged, not only the unused
secondstage align run --dry-run        # say what would be trained; change nothing
secondstage align run --json           # one JSON object per run on stdout (logs stay on stderr), for scripts
    exit status: 0 published / nothing to do, 1 failed, 2 usage, 3 gate refused, 75 lock held (align/job.py)
secondstage align refusals [--json]    # entries gate refusals counted against, and those dead-lettered
secondstage feedback export --out DIR  # dpo.jsonl + kto.jsonl (TRL conversational rows), no training
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.console import Console

from align.settings import AlignSettings

if TYPE_CHECKING:
    from align.job import RunResult

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


def _plain(value: Any) -> Any:
    """`value` with non-finite floats as strings ("inf", "nan"): strict JSON has no Infinity or NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_report(result: RunResult) -> dict[str, Any]:
    """The `--json` object of one run: outcome and exit code, version, rows by kind, duration, each gate check."""
    gate = result.gate or {}
    checks = {
        name: {k: check[k] for k in ("value", "threshold", "passed") if k in check}
        for name, check in (gate.get("checks") or {}).items()
    }
    return _plain(
        {
            "outcome": result.status,
            "exit_code": result.exit_code,
            "message": result.message,
            "version": result.version,
            "parent": result.parent,
            "rows": result.counts,
            "duration_s": result.duration_s,
            # passed is null when the run did not reach the gate (nothing to train, lock held, dry run).
            "gate": {"passed": gate.get("passed"), "failed": gate.get("failed", []), "checks": checks},
            "training": result.metrics,
            "acked": result.acked,
            "run_id": result.run_id,
            # refused / dead_lettered entries of this run, and the dead letters so far (align/refusals.py).
            "entries": result.entries,
            "dead_letters": result.dead_letters,
        }
    )


@contextlib.contextmanager
def _stdout_for_json(enabled: bool) -> Iterator[TextIO]:
    """Yield the real stdout and send everything else printed to stdout (a library's print) to stderr meanwhile,
    so that with --json stdout holds only the JSON objects."""
    out = sys.stdout
    if not enabled:
        yield out
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield out


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
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON object per run on stdout (outcome, version, rows, gate checks, exit code)."
        ),
    ] = False,
) -> None:
    """Train a LoRA version from new feedback, gate it, and publish it to the running servers.

    Exit status of one run (a scheduler should retry only 1):
    0 published, nothing to do, or a dry run;
    1 the run failed (Redis, disk, training): a retry may help;
    2 usage (a flag or its value);
    3 the gate refused the adapter;
    75 another run holds the lock.
    """
    from align.job import AlignError, RunResult, run_every, run_once
    from align.train import TrainError

    # With --json the logs stay plain (no live progress bar: one line per training phase), on stderr.
    console = Console(stderr=True, force_interactive=False if as_json else None)
    settings = _settings(min_feedback=min_feedback)
    with _stdout_for_json(as_json) as stdout:

        def emit(result: RunResult) -> None:
            if as_json:
                stdout.write(json.dumps(run_report(result), allow_nan=False) + "\n")
                stdout.flush()

        try:
            if every is None:
                try:
                    result = run_once(settings, all_feedback=all_feedback, dry_run=dry_run, console=console)
                except Exception as e:
                    # Scripts get their object for any failure; the exception goes on (AlignError and TrainError
                    # to the message below, others to a traceback on stderr), exiting 1 either way.
                    emit(RunResult("failed", f"{type(e).__name__}: {e}"))
                    raise
                emit(result)
                raise typer.Exit(result.exit_code)
            try:
                interval = parse_duration(every)
            except ValueError as e:
                raise typer.BadParameter(str(e), param_hint="--every") from e
            console.print(f"running every {every} ({interval:.0f}s); Ctrl-C to stop")
            try:
                run_every(
                    settings, interval, all_feedback=all_feedback, dry_run=dry_run, console=console, on_result=emit
                )
            except KeyboardInterrupt:
                console.print("stopped")
        except (AlignError, TrainError) as e:
            console.print(f"[red]align run failed: {e}")
            raise typer.Exit(1) from e


@align_app.command("refusals")
def refusals(
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most entries listed of each kind.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """List the feedback entries and policy pairs gate refusals were counted against, and those dead-lettered.

    A refused run leaves its feedback for the next one; an entry refused max_refusals times
    (SECONDSTAGE_MAX_REFUSALS) is taken out of training for good: acknowledged and dead-lettered, with the runs
    that refused it and the checks that failed.
    """
    import time

    import msgspec
    import redis

    from align.job import AlignError, open_redis
    from align.refusals import RefusalLedger
    from core.keys import Keys

    console = Console(stderr=True)
    settings = AlignSettings()  # type: ignore[call-arg]  # every field has a default; mypy can't see pydantic's
    try:
        with open_redis(settings) as client:
            ledger = RefusalLedger(client, Keys(settings.redis_prefix), max_refusals=settings.max_refusals)
            refused, dead = ledger.refused(limit), ledger.dead_letters(limit)
            total_dead = ledger.dead_letter_count()
    except (AlignError, redis.RedisError) as err:
        console.print(f"[red]cannot read the refusals: {err}")
        raise typer.Exit(1) from err
    if as_json:
        report = {
            "max_refusals": settings.max_refusals,
            "refused": msgspec.to_builtins(refused),
            "dead_lettered": msgspec.to_builtins(dead),
            "dead_letters": total_dead,
        }
        sys.stdout.write(json.dumps(report) + "\n")
        return

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t)) if t else "-"

    out = Console()
    out.print(f"refused, still trainable (taken out at {settings.max_refusals} refusals): {len(refused)} listed")
    for e in refused:
        last = e.refusals[-1] if e.refusals else None
        failed = ",".join(last.failed) if last else "-"
        out.print(
            f"  {e.kind} {e.id}  {e.count}/{settings.max_refusals}  last {when(last.at if last else None)}  "
            f"run {last.run if last else '-'}  failed {failed}",
            highlight=False,
            markup=False,
        )
    out.print(f"dead-lettered (never trained again): {total_dead}, newest {len(dead)} listed")
    for e in dead:
        runs = ", ".join(f"{r.run} ({','.join(r.failed)})" for r in e.refusals)
        out.print(f"  {e.kind} {e.id}  at {when(e.dead_lettered_at)}  refused by {runs}", highlight=False, markup=False)


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
    import redis

    from align.datasets import build_datasets, export_jsonl
    from align.feedback import FeedbackError, FeedbackReader, load_policies
    from align.job import AlignError, open_redis
    from align.refusals import RefusalLedger
    from core.keys import Keys

    console = Console(stderr=True)
    settings = AlignSettings()  # type: ignore[call-arg]  # every field has a default; mypy can't see pydantic's
    try:
        # The same rows a run would train on: corrections through the policies, nothing already trained.
        policies = load_policies(settings.policies_dir)
        with open_redis(settings) as client:
            reader = FeedbackReader(
                client,
                Keys(settings.redis_prefix),
                consumer=settings.consumer_name,
                max_rows_per_user=settings.max_rows_per_user,
                include_policy_pairs=settings.include_policy_pairs,
                missing_completion_wait_s=settings.missing_completion_wait_s,
                policies=policies,
                # Nor what the gate refused max_refusals times (align/refusals.py).
                refusals=RefusalLedger(client, Keys(settings.redis_prefix), max_refusals=settings.max_refusals),
            )
            batch = reader.read(all_feedback=all_feedback, consume=False)
        data = build_datasets(batch)
        data.counts.update(batch.screened)
        paths = export_jsonl(data, out)
    except (AlignError, FeedbackError, redis.RedisError, OSError) as e:
        # One line and exit 1, like `align run`: these are the operator's to fix (Redis, policies, the --out path).
        console.print(f"[red]feedback export failed: {e}")
        raise typer.Exit(1) from e
    for name, path in paths.items():
        console.print(f"{name}: {len(data.dpo_rows if name == 'dpo' else data.kto_rows)} rows → {path}")
    console.print(f"counts: {data.summary()}")
