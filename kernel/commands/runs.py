"""``modelloop runs``: list, show, trace and compare runs from their manifests."""

from __future__ import annotations

import json

import click


@click.group("runs", invoke_without_command=True)
@click.option("--stage", help="Only runs of this stage (sft, rlhf, eval, ...).")
@click.pass_context
def runs_command(ctx: click.Context, stage: str | None) -> None:
    """List the runs under the runs folder ($MODELLOOP_HOME/runs, else ./runs)."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from modelloop.lineage import find_runs

    table = Table(box=None, pad_edge=False)
    table.add_column("id", no_wrap=True)  # never cut: it is what `runs show` takes
    for column in ("stage", "status", "parent", "key metric", "started"):
        table.add_column(column)
    for run in find_runs():
        if stage and run.stage != stage:
            continue
        manifest = run.manifest
        table.add_row(run.id, run.stage, str(manifest.get("status", "")), str(run.parent or ""), run.key_metric(), str(manifest.get("started", "")))
    _console().print(table)


@runs_command.command("show")
@click.argument("run")
def show_command(run: str) -> None:
    """Print one run's manifest (RUN: its id, the end of its id, or its folder)."""
    from modelloop.lineage import find_run

    found = find_run(run)
    click.echo(f"{found.id}  ({found.path})")
    click.echo(json.dumps(found.manifest, indent=2, ensure_ascii=False))


@runs_command.command("tree")
def tree_command() -> None:
    """The lineage: each run under the run its model came from, with its key metric."""
    from modelloop.lineage import find_runs, tree_lines

    for line in tree_lines(find_runs()):
        click.echo(line)


@runs_command.command("diff")
@click.argument("first")
@click.argument("second")
def diff_command(first: str, second: str) -> None:
    """The config keys and metrics in which two runs differ."""
    from rich.table import Table

    from modelloop.lineage import diff, find_run, find_runs

    runs = find_runs()
    one, two = find_run(first, runs), find_run(second, runs)
    table = Table("key", one.id, two.id, box=None, pad_edge=False)
    for key, left, right in diff(one, two):
        table.add_row(key, json.dumps(left), json.dumps(right))
    _console().print(table)


def _console():
    """Rich's console, as wide as the terminal, or wide enough not to cut ids when piped."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=240)
