"""Reading data files record by record, with the line each record came from.

JSONL, JSON (an array of objects), CSV, Parquet and a folder written by
``datasets.save_to_disk``. A record that cannot be parsed becomes a ``Problem`` naming
its file and line; the rest of the file is still read, so one run reports every bad
line at once. For tabular files (CSV, Parquet, datasets) the "line" is the 1-based
row number, and CSV rows count their header line.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.errors import ModelloopError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ModelloopError):
    """Data that cannot be used as given: a missing file, bad records, a bad mix."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record (or a whole file), where the user can find it."""

    location: str
    reason: str

    def __str__(self) -> str:
        return f"{self.location}: {self.reason}"


@dataclass(frozen=True)
class RawRecord:
    location: str
    data: Any


@dataclass(frozen=True)
class DataSource:
    """A data file with its sampling ratio (``data.jsonl#0.3``) and an optional forced format."""

    path: Path
    ratio: float = 1.0
    format: str | None = None

    @classmethod
    def parse(cls, text: str | Path | DataSource, format: str | None = None) -> DataSource:
        """``path`` or ``path#ratio``: 0.3 takes a seeded 30 % of the file, 2 takes it twice."""
        if isinstance(text, DataSource):
            return text
        text = str(text)
        match = re.fullmatch(r"(.+)#([0-9]*\.?[0-9]+)", text)
        if match:
            ratio = float(match.group(2))
            if ratio <= 0:
                raise DataError(f"{text}: the sampling ratio must be positive")
            return cls(Path(match.group(1)), ratio, format)
        return cls(Path(text), 1.0, format)


@dataclass
class SourceFile:
    """An opened data file: its records, and its column names when the file has a schema."""

    records: Iterator[RawRecord | Problem]
    columns: tuple[str, ...] | None


def open_source(path: Path) -> SourceFile:
    """Open one data file (or datasets folder) for reading."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _datasets_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return SourceFile(_jsonl(path), None)
    if suffix == ".json":
        return SourceFile(_json_array(path), None)
    if suffix == ".csv":
        return _csv(path)
    if suffix == ".parquet":
        return _parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)} or a datasets folder)")


NOT_UTF8 = "not UTF-8 text (save the file as UTF-8)"


def _jsonl(path: Path) -> Iterator[RawRecord | Problem]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            location = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Problem(location, NOT_UTF8)
                continue
            if not line.strip():
                continue
            try:
                yield RawRecord(location, json.loads(line))
            except json.JSONDecodeError as error:
                yield Problem(location, f"malformed JSON: {error.msg} (column {error.colno})")


def _json_array(path: Path) -> Iterator[RawRecord | Problem]:
    """Each element of a top-level array, located by the line it starts on."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        yield Problem(f"{path}:1", NOT_UTF8)
        return
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"\s*")
    line, counted = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    position = whitespace.match(text, 0).end()
    if not text.startswith("[", position):
        yield Problem(f"{path}:{line_at(position)}", "a .json data file must hold an array of records (use .jsonl for one per line)")
        return
    position = whitespace.match(text, position + 1).end()
    first = True
    while True:
        if position >= len(text):
            yield Problem(f"{path}:{line_at(position)}", "the array is not closed with ']' (is the file cut short?)")
            return
        if text[position] == "]":
            return
        if not first:
            if text[position] != ",":
                yield Problem(f"{path}:{line_at(position)}", "expected ',' between records")
                return
            position = whitespace.match(text, position + 1).end()
        try:
            value, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            yield Problem(f"{path}:{error.lineno}", f"malformed JSON: {error.msg} (column {error.colno})")
            return
        yield RawRecord(f"{path}:{line_at(position)}", value)
        position = whitespace.match(text, end).end()
        first = False


def _csv(path: Path) -> SourceFile:
    handle = path.open(encoding="utf-8", newline="")
    try:
        reader = csv.DictReader(handle)
        columns = tuple(reader.fieldnames or ())
    except UnicodeDecodeError:
        handle.close()
        return SourceFile(iter([Problem(f"{path}:1", NOT_UTF8)]), ())

    def records() -> Iterator[RawRecord | Problem]:
        with handle:
            while True:
                start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except UnicodeDecodeError:
                    yield Problem(f"{path}:{start}", NOT_UTF8)
                    return
                except csv.Error as error:
                    yield Problem(f"{path}:{start}", f"malformed CSV: {error}")
                    return
                if None in row:
                    yield Problem(f"{path}:{start}", f"more fields than the {len(columns)} columns of the header")
                    continue
                yield RawRecord(f"{path}:{start}", row)

    return SourceFile(records(), columns)


def _parquet(path: Path) -> SourceFile:
    import pyarrow.parquet

    table = pyarrow.parquet.read_table(path)
    return SourceFile(_rows(path, table.to_pylist()), tuple(table.column_names))


def _datasets_folder(path: Path) -> SourceFile:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: a folder must be one written by datasets' save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split (found: {', '.join(dataset)})")
        dataset = dataset["train"]
    return SourceFile(_rows(path, dataset), tuple(dataset.column_names))


def _rows(path: Path, rows: Any) -> Iterator[RawRecord]:
    for number, row in enumerate(rows, start=1):
        yield RawRecord(f"{path}:{number}", row)
