"""``modelloop run``: a recipe's stages, checked as a whole, then run in order."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
@click.argument("recipe", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--set",
    "assignments",
    multiple=True,
    help="Override a stage's key: --set sft.lr=1e-4 (vars.NAME=... for a variable).",
)
@click.option(
    "--resume",
    is_flag=False,
    flag_value="latest",
    default=None,
    help="Continue the latest unfinished recipe run (or the one given).",
)
@click.option("--check", "check_only", is_flag=True, help="Check every stage, run nothing.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The recipe run's folder (default: runs/<time>-recipe-<name>).",
)
def run_command(
    recipe: Path | None, assignments: tuple[str, ...], resume: str | None, check_only: bool, output_dir: Path | None
) -> None:
    """Run RECIPE.yaml: a base model and stages (new-model, pt, sft, rlhf, export, serve-check, eval)."""
    from modelloop.recipes import check_recipe, load_recipe, resume_recipe, run_recipe

    if resume is not None:
        if recipe is not None or assignments:
            raise click.UsageError("--resume continues a recipe run as it was started: give no RECIPE or --set")
        resume_recipe(None if resume == "latest" else resume)
        return
    if recipe is None:
        raise click.UsageError("give a RECIPE.yaml (or --resume)")
    loaded = load_recipe(recipe, assignments)
    if check_only:
        check_recipe(loaded)
        click.echo(
            f"{recipe}: {len(loaded.steps)} stages checked: "
            + ", ".join(f"{step.name} ({step.kind})" for step in loaded.steps)
        )
        return
    run_recipe(loaded, output_dir=output_dir)
