"""`secondstage policy …`: validate rule files and try texts against them.

    secondstage policy check [DIR]                      # validate, run every rule's examples
    secondstage policy test "TEXT" --stage output       # which rules fire, and the resulting text

(`policy_app` is a typer app; the main CLI mounts it as `policy`. Run it alone with
`python -m serve.policy.cli check policies/`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from core.policy.checks import run_examples
from core.policy.engine import PolicyEngine
from core.policy.errors import PolicyError
from core.policy.scope import RequestContext

policy_app = typer.Typer(help="Check and try the operator rule policies.", no_args_is_help=True)


def _load(directory: Path, console: Console) -> PolicyEngine:
    engine = PolicyEngine(directory)
    try:
        engine.load()
    except PolicyError as exc:
        console.print(f"[bold red]invalid rule set[/]: {exc}", highlight=False)
        raise typer.Exit(2) from None
    return engine


@policy_app.command()
def check(
    directory: Annotated[Path, typer.Argument(help="Directory of rule files.")] = Path("policies"),
) -> None:
    """Validate the rule files and run every rule's match/no_match examples; exit 1 on any failure."""
    console = Console(soft_wrap=True)  # long paths and messages stay on one greppable line
    engine = _load(directory, console)
    ps = engine.active
    failures, ran = run_examples(ps)
    without = [r.id for r in ps.rules if r.examples is None and r.kind in ("keywords", "regex", "preset")]
    for rule_id in without:
        console.print(f"[yellow]warning[/]: rule {rule_id!r} has no examples", highlight=False)
    if failures:
        # Plain lines, not a table: they must stay greppable in CI logs at any terminal width.
        for f in failures:
            console.print(f"[red]FAIL[/] {f.file}: rule {f.rule_id!r} ({f.stage}): {f.problem}", highlight=False)
            console.print(f"     text: {f.text!r}", highlight=False, markup=False)
        console.print(f"[bold red]{len(failures)} example(s) failed[/] of {ran}", highlight=False)
        raise typer.Exit(1)
    console.print(
        f"[green]ok[/]: {len(ps.rules)} rules in {len(ps.files)} files, {ran} examples pass; "
        f"version {ps.version}, output hold-back {ps.hold_back} chars",
        highlight=False,
    )


@policy_app.command("test")
def test_text(
    text: Annotated[str, typer.Argument(help="The text to try.")],
    stage: Annotated[str, typer.Option(help="input (a user message) or output (a model response).")] = "output",
    directory: Annotated[Path, typer.Option("--dir", help="Directory of rule files.")] = Path("policies"),
    model: Annotated[str, typer.Option(help="Model name, for rule scopes.")] = "",
    user: Annotated[str | None, typer.Option(help="User, for rule scopes.")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key, for rule scopes.")] = None,
) -> None:
    """Show which rules fire on TEXT and what the text becomes."""
    console = Console(soft_wrap=True)  # long paths and messages stay on one greppable line
    if stage not in ("input", "output"):
        console.print(f"[red]--stage must be input or output, got {stage!r}[/]", highlight=False)
        raise typer.Exit(2)
    engine = _load(directory, console)
    ctx = RequestContext(api_key=api_key, user=user, model=model)
    if stage == "input":
        res = engine.check_input([{"role": "user", "content": text}], ctx, None)
        decisions, blocked, refusal = res.decisions, res.blocked, res.refusal
        result = "\n---\n".join(f"{m['role']}: {m.get('content')}" for m in res.messages)
    else:
        f = engine.output_filter(ctx)
        steps = [f.feed(text), f.finish()]
        decisions, blocked, refusal = f.decisions, f.stopped, f.refusal
        result = "".join(step.text for step in steps)  # what the client receives, refusal included
    console.print(f"{len(decisions)} decision(s), rule set {engine.active.version}", highlight=False)
    for d in decisions:
        span = f" span={d.span[0]}-{d.span[1]}" if d.span else ""
        detail = f" ({d.detail})" if d.detail else ""
        console.print(f"  {d.rule_id}: {d.kind} {d.action} [{d.mode}]{span}{detail}", highlight=False, markup=False)
    if blocked:
        console.print(f"[bold red]blocked[/] (finish_reason content_filter); refusal: {refusal}", highlight=False)
        if stage == "output":
            console.print(f"the client receives: {result!r}", highlight=False)
    else:
        console.print("[bold]result:[/]", highlight=False)
        console.print(result, highlight=False, markup=False)


if __name__ == "__main__":
    policy_app()
