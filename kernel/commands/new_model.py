"""``modelloop new-model``: a random-weight model of a real architecture, with no network."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("new-model")
@click.option("--family", required=True, help="Model family (see `modelloop plugins --hook register_models`).")
@click.option("--preset", default="tiny", show_default=True, help="Architecture preset of the family (tiny, qwen2.5-0.5b, ...).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option(
    "--corpus",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also train the tokenizer on these files (JSONL records or text lines).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for the weights and the generated corpus.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def new_model_command(family: str, preset: str, out: Path, corpus: tuple[Path, ...], seed: int, overwrite: bool) -> None:
    """Build a model with random weights, its tokenizer and chat template, into --out."""
    from modelloop.models.loading import load_model
    from modelloop.models.new_model import new_model

    new_model(family, preset, out, corpus_files=corpus, seed=seed, overwrite=overwrite)
    loaded = load_model(out)
    parameters = sum(parameter.numel() for parameter in loaded.model.parameters())
    click.echo(
        f"{out}: {loaded.family.name} {preset}, {parameters / 1e6:.2f} M parameters, "
        f"vocabulary {len(loaded.tokenizer)}, model type {loaded.model.config.model_type}"
    )
