"""Files -> canonical records: format detection per file, validation per record, mixing.

Every record of every file is checked before anything trains; each bad one becomes a
``Problem`` (``file:line: reason``). A file's format is detected from its first record
(or forced), then every record of that file must fit it.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelloop.data.media import check_record_media
from modelloop.data.sources import DataError, DataSource, Problem, RawRecord, open_source
from modelloop.registry import DATASET_FORMATS, get_registry
from modelloop.specs import DatasetFormat, DatasetKind


@dataclass(frozen=True)
class Example:
    """One canonical record and where it came from."""

    location: str
    kind: DatasetKind
    record: dict[str, Any]


@dataclass
class Records:
    """What reading some data files gave: the good examples and every problem found."""

    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    formats: dict[Path, str] = field(default_factory=dict)


def detect_format(record: Any) -> DatasetFormat:
    """The first registered format a record fits, or a DataError naming what was expected."""
    formats = get_registry(DATASET_FORMATS)
    if isinstance(record, Mapping):
        for candidate in formats:
            if candidate.matches(record):
                return candidate
        found = ", ".join(sorted(record)) or "none"
    else:
        found = f"a {type(record).__name__}, not an object"
    expected = "; ".join(f"{f.name} ({', '.join(f.columns)})" for f in formats)
    raise DataError(f"no data format fits this record (fields: {found}). Formats: {expected}")


class FileFormat:
    """One file's records made canonical: its format is the one forced (or ``detected``
    from an earlier reading), else detected from its first record; every record is then
    checked against it. ``done`` once the file cannot give a record (its columns lack one
    the format needs); ``name`` is the format once settled."""

    def __init__(
        self,
        where: str | Path,
        format_name: str | None,
        allowed: Sequence[str] | None,
        columns: Sequence[str] | None,
        *,
        base: Path,
        detected: str | None = None,
    ) -> None:
        self.where = where
        self.allowed = allowed
        self.columns = columns
        self.base = base
        name = format_name or detected
        self.chosen: DatasetFormat | None = get_registry(DATASET_FORMATS).get(name) if name else None
        self.name: str | None = detected
        self.done = False

    def convert(self, item: RawRecord | Problem) -> Example | Problem:
        """The canonical record, or what is wrong with it; a file of a kind the caller
        cannot use is refused as a whole (DataError)."""
        if isinstance(item, Problem):
            return item
        if self.name is None:
            if self.chosen is None:
                try:
                    self.chosen = detect_format(item.data)
                except DataError as error:  # this record is bad; the next may still tell the format
                    return Problem(item.location, str(error))
            chosen = self.chosen
            missing = [column for column in chosen.columns if column not in (self.columns or chosen.columns)]
            if missing:
                self.done = True
                return Problem(
                    f"{self.where}:1",
                    f"no column {missing[0]!r} for format {chosen.name} (columns: {', '.join(self.columns or ())})",
                )
            if self.allowed is not None and chosen.kind not in self.allowed:
                raise DataError(
                    f"{self.where}: holds {chosen.kind} records (format {chosen.name}); this stage needs {' or '.join(self.allowed)} data"
                )
            self.name = chosen.name
        assert self.chosen is not None
        return _convert(self.chosen, item, self.base)


def _convert_file(
    source: DataSource, format_name: str | None, records: Records, allowed: Sequence[str] | None
) -> list[Example]:
    opened = open_source(source.path)
    converter = FileFormat(source.path, format_name, allowed, opened.columns, base=source.path.parent)
    examples: list[Example] = []
    for item in opened.records:
        example = converter.convert(item)
        if isinstance(example, Problem):
            records.problems.append(example)
        else:
            examples.append(example)
        if converter.done:
            break
    if converter.name is not None:
        records.formats[source.path] = converter.name
    return examples


def _convert(chosen: DatasetFormat, item: RawRecord, base: Path) -> Example | Problem:
    """The canonical record, its media (if any) resolved against ``base`` and opened."""
    if not isinstance(item.data, Mapping):
        return Problem(item.location, f"record is a {type(item.data).__name__}, not an object")
    missing = [column for column in chosen.columns if column not in item.data]
    if missing:
        return Problem(item.location, f"missing field {missing[0]!r} (format {chosen.name})")
    try:
        record = chosen.convert(item.data)
        return Example(item.location, chosen.kind, check_record_media(record, base))
    except (ValueError, TypeError, KeyError) as error:
        reason = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        return Problem(item.location, reason)


def _sample(examples: list[Example], ratio: float, seed: int, path: Path) -> list[Example]:
    """``ratio`` copies of a file's examples: whole copies, then a seeded share of the rest."""
    whole, share = divmod(ratio, 1.0)
    picked = examples * int(whole)
    extra = round(share * len(examples))
    if extra:
        rng = random.Random(f"{seed}:{path}")
        picked += [examples[i] for i in sorted(rng.sample(range(len(examples)), extra))]
    return picked


def read_records(
    sources: Iterable[str | Path | DataSource],
    *,
    format: str | None = None,
    kinds: Sequence[str] | None = None,
    seed: int = 0,
) -> Records:
    """Read, detect, validate and mix data files.

    :param format: a registered format forced on every file without its own.
    :param kinds: the record kinds the caller can use (``conversation`` for sft); a file
        of another kind is refused as a whole.
    :param seed: for the share sampled from files with a fractional ratio.
    """
    records = Records()
    parsed = [DataSource.parse(source) for source in sources]
    if not parsed:
        raise DataError("no data files given")
    for source in parsed:
        examples = _convert_file(source, source.format or format, records, kinds)
        records.examples += _sample(examples, source.ratio, seed, source.path)
    return records
