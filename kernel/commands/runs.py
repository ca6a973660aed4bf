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
    from modelloop.lineage import find_runs

    rows = [
        [
            run.id,
            run.stage,
            str(run.manifest.get("status", "")),
            str(run.parent or ""),
            run.key_metric(),
            run.benchmark_summary(),
            str(run.manifest.get("started", "")),
        ]
        for run in find_runs()
        if not stage or run.stage == stage
    ]
    _print_columns(["id", "stage", "status", "parent", "key metric", "benchmarks", "started"], rows)


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
    """The config keys, metrics and benchmark scores in which two runs differ."""
    from modelloop.lineage import diff, find_run, find_runs

    runs = find_runs()
    one, two = find_run(first, runs), find_run(second, runs)
    _print_columns(
        ["key", one.id, two.id], [[key, json.dumps(left), json.dumps(right)] for key, left, right in diff(one, two)]
    )


def _print_columns(header: list[str], rows: list[list[str]]) -> None:
    """Aligned plain columns: quick for thousands of rows, and an id is never cut."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    click.echo(
        "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])
    )
