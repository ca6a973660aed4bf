"""``modelloop data check`` and ``modelloop data preview``: see the data as the model will."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from modelloop.data.media import Media, MediaTokens
    from modelloop.data.records import Example
    from modelloop.data.sources import Problem
    from modelloop.data.tokenize import Encoded, Encoder, Truncation

SOURCE = click.argument("files", nargs=-1, required=True)
MODEL = click.option("--model", "model", help="Model folder or hub id whose tokenizer and template to use.")
FORMAT = click.option("--format", "format_name", help="Force a data format (default: detected per file).")
TEMPLATE = click.option("--template", help="Use this registered chat template instead of the model's.")


def _encoder(model: str, template: str | None) -> Encoder:
    """The model's encoder: its tokenizer, chat template and (multimodal models) media."""
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import Encoder
    from modelloop.models.loading import load_media_tokens, load_tokenizer, read_config, resolve_family

    tokenizer = load_tokenizer(model)
    config = read_config(model)
    family = resolve_family(config.model_type)
    media = load_media_tokens(family, model, config, tokenizer)
    return Encoder(tokenizer, resolve_chat_format(tokenizer, family, template), media)


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
    encoder = _encoder(model, template) if model else None
    if encoder is not None:
        good, unusable, longer = _measured(encoder, good, max_length, truncation)
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
    for line in _media_summary(good, encoder):
        click.echo(line)
    if longer:
        action = "truncated" if truncation == "truncate" else "dropped"
        click.echo(
            f"{len(longer)} records longer than {max_length} tokens would be {action} (longest: {_longest(longer).measured()})"
        )
    if problems:
        sys.exit(1)


def _media_summary(examples: Sequence[Example], encoder: Encoder | None) -> list[str]:
    """A line for each kind of media the records hold: how many items, each clip's length,
    and (with a model) the tokens each item takes."""
    from modelloop.data.audio import open_audio
    from modelloop.data.media import BY_NAME, record_media
    from modelloop.data.video import open_video

    by_kind: dict[str, list[Media]] = {}
    for example in examples:
        for item in record_media(example.record):
            by_kind.setdefault(item.kind, []).append(item)
    lines = []
    for kind, items in by_kind.items():
        parts = [f"{len(items)} {BY_NAME[kind].column}"]
        if kind in ("audio", "video"):
            seconds = [
                (open_audio(item.source) if kind == "audio" else open_video(item.source, max_frames=1)).seconds
                for item in items
            ]
            parts.append(f"{min(seconds):.1f}-{max(seconds):.1f} s a clip, {sum(seconds):.1f} s in all")
        if encoder is not None and encoder.media is not None and encoder.media.takes(kind):
            counts = [
                count for start in range(0, len(items), 64) for count in encoder.media.counts(items[start : start + 64])
            ]
            parts.append(f"{min(counts)}-{max(counts)} tokens each, {sum(counts)} in all")
        lines.append(f"{kind}: " + ", ".join(parts))
    return lines


@data_command.command("preview")
@click.argument("file")
@MODEL
@click.option("-n", "count", type=click.IntRange(min=1), default=3, show_default=True, help="How many records.")
@FORMAT
@TEMPLATE
def preview_command(file, model, count, format_name, template) -> None:
    """Show the first records of FILE rendered as the model sees them, trained text highlighted.

    On a terminal the trained text is green; piped, it is marked with «». A picture's
    or a clip's tokens show as TOKEN×N [file], where they go in the text.
    """
    import re

    from rich.console import Console
    from rich.text import Text

    from modelloop.data.labels import IGNORE
    from modelloop.data.media import record_media
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
        media = record_media(example.record)
        counts = encoder.media.counts(media) if media and encoder.media is not None else []
        tokens = {encoder.media.kinds[item.kind].token: item.kind for item in media} if counts else {}
        splitter = re.compile("(" + "|".join(re.escape(token) for token in tokens) + ")") if tokens else None
        for sequence, encoded in zip(encoder.pieces(example), sequences):
            text = Text()
            shown = {kind: iter([(i, c) for i, c in zip(media, counts) if i.kind == kind]) for kind in tokens.values()}
            for piece, trained in sequence:
                for part in splitter.split(piece) if splitter else [piece]:
                    if not part:
                        continue
                    if part in tokens:
                        item, count = next(shown[tokens[part]])
                        text.append(f"{part}×{count} [{_described(item, encoder.media)}]", style="magenta")
                    elif trained and not console.is_terminal:
                        text.append(f"«{part}»")
                    else:
                        text.append(part, style="bold green" if trained else "dim")
            console.print(text, soft_wrap=True)  # a line as the model sees it, not folded at the terminal width
            trained_tokens = sum(label != IGNORE for label in encoded.labels)
            per_kind = Counter()
            for item, count in zip(media, counts):
                per_kind[item.kind] += count
            console.print(
                f"{len(encoded)} tokens, {trained_tokens} trained"
                + "".join(f", {count} {kind} tokens" for kind, count in per_kind.items()),
                style="cyan",
            )


def _described(item: Media, media: MediaTokens) -> str:
    """How preview names an item: its file name (a clip with its length, a video with the
    frames the model sees)."""
    source = item.source
    if isinstance(source, list):  # a video's frames
        return f"{len(source)} frames from {Path(source[0]).name}"
    name = "data URL" if source.startswith("data:") else Path(source).name
    if item.kind == "audio":
        from modelloop.data.audio import open_audio

        return f"{name}, {open_audio(source).seconds:.1f} s"
    if item.kind == "video":
        video = media.open(item).source
        return f"{name}, {video.seconds:.1f} s, {len(video.frames)} frames"
    return name


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
