"""``modelloop new-model``: a random-weight model of a real architecture, with no network."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("new-model")
@click.option("--family", required=True, help="Model family (see `modelloop plugins --hook register_models`).")
@click.option(
    "--preset", default="tiny", show_default=True, help="Architecture preset of the family (tiny, qwen2.5-0.5b, ...)."
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option(
    "--corpus",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also train the tokenizer on these files (JSONL records or text lines).",
)
@click.option("--seed", default=0, show_default=True, help="Seed for the weights and the generated corpus.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="What the weights are saved in.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where the weights are drawn (cuda: a 7B shape in seconds).",
)
def new_model_command(
    family: str, preset: str, out: Path, corpus: tuple[Path, ...], seed: int, overwrite: bool, dtype: str, device: str
) -> None:
    """Build a model with random weights, its tokenizer and chat template, into --out."""
    import torch

    from modelloop.models.loading import load_tokenizer, model_class, read_config, resolve_family
    from modelloop.models.new_model import new_model

    new_model(family, preset, out, corpus_files=corpus, seed=seed, overwrite=overwrite, dtype=dtype, device=device)
    config = read_config(out)
    claimed = resolve_family(config.model_type)
    with torch.device("meta"):  # counted without reading the weights back
        parameters = sum(parameter.numel() for parameter in model_class(claimed).from_config(config).parameters())
    click.echo(
        f"{out}: {claimed.name} {preset}, {parameters / 1e6:.2f} M parameters, "
        f"vocabulary {len(load_tokenizer(out))}, model type {config.model_type}"
    )
