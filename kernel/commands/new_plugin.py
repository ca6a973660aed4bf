"""``modelloop new-plugin KIND NAME``: scaffold a third-party plugin package."""

from __future__ import annotations

from pathlib import Path

import click

from modelloop.scaffold import KINDS, scaffold_plugin


@click.command("new-plugin")
@click.argument("kind", type=click.Choice(sorted(KINDS)))
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to create the package folder.",
)
def new_plugin_command(kind: str, name: str, directory: Path) -> None:
    """Create the package modelloop-plugin-NAME implementing one KIND of hook."""
    target = scaffold_plugin(kind, name, directory)
    click.echo(f"Created {target}")
    click.echo(f"Next: pip install -e '{target}[test]' && pytest {target}")
