"""``modelloop data check`` and ``modelloop data preview``: see the data as the model will."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from modelloop.data.records import Example
    from modelloop.data.sources import Problem
    from modelloop.data.tokenize import Encoded, Encoder, Truncation

SOURCE = click.argument("files", nargs=-1, required=True)
MODEL = click.option("--model", "model", help="Model folder or hub id whose tokenizer and template to use.")
FORMAT = click.option("--format", "format_name", help="Force a data format (default: detected per file).")
TEMPLATE = click.option("--template", help="Use this registered chat template instead of the model's.")


def _encoder(model: str, template: str | None) -> Encoder:
    """The model's encoder: its tokenizer, chat template and (vision models) pictures."""
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_image_tokens, load_tokenizer, read_config, resolve_family

    tokenizer = load_tokenizer(model)
    config = read_config(model)
    family = resolve_family(config.model_type)
    images = load_image_tokens(family, model, config, tokenizer)
    return Encoder(tokenizer, resolve_chat_format(tokenizer, family, template), images)


def _longest(sequences: Iterable[Encoded]) -> Encoded:
    """The longest sequence: one cut at N tokens is longer than one of exactly N."""
    return max(sequences, key=lambda sequence: (len(sequence), sequence.cut))


def _measured(
    encoder: Encoder, examples: Sequence[Example], max_length: int | None, truncation: Truncation
) -> tuple[list[Example], list[Problem], list[Encoded]]:
    """The examples that render (and fit, with ``--truncation error``), the problems of
    the others, and the longest sequence of each record longer than ``max_length``:
    tokenised a batch at a time, and each record only as far as its length is needed."""
    from modelloop.data.sources import Problem
    from modelloop.data.tokenize import too_long

    kept: list[Example] = []
    problems: list[Problem] = []
    longer: list[Encoded] = []
    for example, sequences in encoder.each(examples, max_length):
        if isinstance(sequences, Problem):
            problems.append(sequences)
            continue
        longest = _longest(sequences)
        if max_length and len(longest) > max_length:
            if truncation == "error":
                problems.append(too_long(example.location, longest, max_length))
                continue
            longer.append(longest)
        kept.append(example)
    return kept, problems, longer


@click.group("data")
def data_command() -> None:
    """Validate and preview training data."""


@data_command.command("check")
@SOURCE
@MODEL
@click.option("--max-length", type=click.IntRange(min=1), help="Count records longer than this (needs --model).")
@click.option(
    "--truncation",
    type=click.Choice(["truncate", "drop", "error"]),
    default="truncate",
    show_default=True,
    help="What training does with a record longer than --max-length (error: it is a bad record).",
)
@FORMAT
@TEMPLATE
def check_command(files, model, max_length, truncation, format_name, template) -> None:
    """Check every record of FILES; print each problem as file:line: reason.

    Exits with 1 if any record is bad or a file holds none. FILES may carry a sampling
    ratio: data.jsonl#0.5.
    """
    from modelloop.data.records import read_records
    from modelloop.data.sources import DataSource

    if max_length and not model:
        raise click.UsageError("--max-length needs --model (lengths are counted in the model's tokens)")
    records = read_records(files, format=format_name)
    problems: list[Problem | str] = list(records.problems)
    good = list(records.examples)
    longer: list[Encoded] = []
    if model:
        good, unusable, longer = _measured(_encoder(model, template), good, max_length, truncation)
        problems += unusable
    located = [str(problem) for problem in records.problems] + [example.location for example in records.examples]
    for path in (DataSource.parse(file).path for file in files):
        if not any(text.startswith(f"{path}:") for text in located):
            problems.append(f"{path}: no records")
    for problem in problems:
        click.echo(str(problem))
    for path, format_used in records.formats.items():
        count = sum(1 for example in good if example.location.startswith(f"{path}:"))
        click.echo(f"{path}: {format_used}, {count} records")
    kinds = Counter(example.kind for example in good)
    click.echo(f"{len(good)} good records ({', '.join(f'{n} {k}' for k, n in kinds.items())}), {len(problems)} bad")
    if longer:
        action = "truncated" if truncation == "truncate" else "dropped"
        click.echo(
            f"{len(longer)} records longer than {max_length} tokens would be {action} (longest: {_longest(longer).measured()})"
        )
    if problems:
        sys.exit(1)


@data_command.command("preview")
@click.argument("file")
@MODEL
@click.option("-n", "count", type=click.IntRange(min=1), default=3, show_default=True, help="How many records.")
@FORMAT
@TEMPLATE
def preview_command(file, model, count, format_name, template) -> None:
    """Show the first records of FILE rendered as the model sees them, trained text highlighted.

    On a terminal the trained text is green; piped, it is marked with «». A picture's
    image tokens show as TOKEN×N [file], where they go in the text.
    """
    from rich.console import Console
    from rich.text import Text

    from modelloop.data.labels import IGNORE
    from modelloop.data.records import read_records
    from modelloop.data.sources import Problem

    if not model:
        raise click.UsageError("preview needs --model (the template and tokenizer are the model's)")
    encoder = _encoder(model, template)
    records = read_records([Path(file)], format=format_name)
    console = Console(highlight=False)
    for problem in records.problems[:count]:
        console.print(str(problem), style="red", markup=False)
    for example in records.examples[:count]:
        console.rule(example.location)
        (sequences,) = encoder.encode([example])
        if isinstance(sequences, Problem):
            console.print(str(sequences), style="red", markup=False)
            continue
        pictures = (
            list(zip(example.record.get("images") or [], encoder.images.counts(example.record["images"])))
            if example.record.get("images")
            else []
        )
        for sequence, encoded in zip(encoder.pieces(example), sequences):
            text = Text()
            shown = iter(pictures)
            for piece, trained in sequence:
                for number, part in enumerate(piece.split(encoder.images.spec.image_token) if pictures else [piece]):
                    if number:
                        picture, count = next(shown)
                        text.append(
                            f"{encoder.images.spec.image_token}×{count} [{Path(picture).name if not picture.startswith('data:') else 'data URL'}]",
                            style="magenta",
                        )
                    if trained and not console.is_terminal:
                        text.append(f"«{part}»")
                    else:
                        text.append(part, style="bold green" if trained else "dim")
            console.print(text, soft_wrap=True)  # a line as the model sees it, not folded at the terminal width
            trained_tokens = sum(label != IGNORE for label in encoded.labels)
            image_tokens = sum(count for _, count in pictures)
            console.print(
                f"{len(encoded)} tokens, {trained_tokens} trained"
                + (f", {image_tokens} image tokens" if image_tokens else ""),
                style="cyan",
            )


@data_command.command("from-logs")
@click.argument("log", type=click.Path(file_okay=False))
@click.option(
    "--as",
    "kind",
    type=click.Choice(["sft", "kto", "preference"]),
    required=True,
    help="sft: liked and corrected answers; kto: judged answers labelled; preference: corrections and liked answers "
    "chosen over the answers they beat.",
)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The JSONL file to write.")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="A score (0 to 1) at or above it is liked.",
)
def from_logs_command(log: str, kind: str, out: str, threshold: float) -> None:
    """Training data from what a served model answered and what its users thought of it
    (LOG: the folder `serve --log` wrote)."""
    from modelloop.data.from_logs import collect, make, write

    answers, left_out = collect(log, threshold=threshold)
    made = make(answers, kind)  # type: ignore[arg-type]
    made.left_out.update(left_out)
    origin = write(made, Path(out), log=Path(log), kind=kind)  # type: ignore[arg-type]
    runs = ", ".join(sorted(made.runs)) or "no run (a model folder was served)"
    click.echo(f"wrote {len(made.records)} {kind} records to {out} from {len(answers)} logged answers of {runs}")
    for why, count in made.left_out.most_common():
        click.echo(f"  left out: {count} {why}")
    click.echo(f"origin: {origin} (a run trained on {out} records it)")
