"""Reading data files record by record, with the line each record came from.

JSONL, JSON (an array of objects), CSV, Parquet and a folder written by
``datasets.save_to_disk``. A record that cannot be parsed becomes a ``Problem`` naming
its file and line; the rest of the file is still read, so one run reports every bad
line at once. For tabular files (CSV, Parquet, datasets) the "line" is the 1-based
row number, and CSV rows count their header line. A file with no line to name (a
damaged Parquet file or datasets folder) is a ``DataError`` naming the file.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
UNDECODED = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" reads a byte that is not UTF-8 as
#: A JSONL line longer than this is refused unread (a file with no newline would be read whole into memory).
MAX_LINE = 256 * 2**20


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object; a key given twice is refused (json would keep the last one silently)."""
    record = dict(pairs)
    if len(record) < len(pairs):
        ((key, _),) = Counter(key for key, _ in pairs).most_common(1)
        raise ValueError(f"the key {key!r} appears twice in one object")
    return record


JSON = json.JSONDecoder(object_pairs_hook=_object)


def _unparsed(error: ValueError | RecursionError) -> str:
    """Why a JSON record could not be parsed, as a Problem's reason."""
    if isinstance(error, json.JSONDecodeError):
        return f"malformed JSON: {error.msg} (column {error.colno})"
    if isinstance(error, RecursionError):
        return "malformed JSON: nested too deeply"
    return f"malformed JSON: {error}"  # a key given twice, an integer of thousands of digits


def _lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """Each line of a file; None for one longer than ``MAX_LINE``, skipped a bounded piece at a time."""
    while line := handle.readline(MAX_LINE + 1):
        if len(line) <= MAX_LINE or line.endswith(b"\n"):
            yield line
            continue
        while (rest := handle.readline(MAX_LINE)) and not rest.endswith(b"\n"):
            pass
        yield None


def _jsonl(path: Path) -> Iterator[RawRecord | Problem]:
    return (item for item, _, _ in read_jsonl_from(path))


def read_jsonl_from(path: Path, offset: int = 0, line: int = 1) -> Iterator[tuple[RawRecord | Problem, int, int]]:
    """Each record of a JSONL file from byte ``offset`` (the start of line ``line``), with
    the byte offset and line number of what follows it: where to read on from later."""
    with path.open("rb") as handle:
        handle.seek(offset)
        for number, raw in enumerate(_lines(handle), start=line):
            offset = offset + len(raw) if raw is not None else handle.tell()
            item = _jsonl_record(f"{path}:{number}", raw)
            if item is not None:
                yield item, offset, number + 1


def _jsonl_record(location: str, raw: bytes | None) -> RawRecord | Problem | None:
    """One JSONL line as a record, a Problem, or None for a blank line."""
    if raw is None:
        return Problem(location, f"a line longer than {MAX_LINE >> 20} MiB")
    try:
        line = raw.decode("utf-8-sig")  # a byte-order mark (Windows Notepad) is no content
    except UnicodeDecodeError:
        return Problem(location, NOT_UTF8)
    if not line.strip():
        return None
    try:
        return RawRecord(location, JSON.decode(line))
    except (ValueError, RecursionError) as error:
        return Problem(location, _unparsed(error))


def _json_array(path: Path) -> Iterator[RawRecord | Problem]:
    """Each element of a top-level array, located by the line it starts on."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        where = raw.count(b"\n", 0, error.start) + 1
        yield Problem(f"{path}:{where}", NOT_UTF8)
        return
    whitespace = re.compile(r"\s*")
    line, counted = 1, 0

    def line_at(position: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, position)
        counted = position
        return line

    position = whitespace.match(text, 0).end()
    if not text.startswith("[", position):
        yield Problem(
            f"{path}:{line_at(position)}",
            "a .json data file must hold an array of records (use .jsonl for one per line)",
        )
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
            value, end = JSON.raw_decode(text, position)
        except (ValueError, RecursionError) as error:
            where = error.lineno if isinstance(error, json.JSONDecodeError) else line_at(position)
            yield Problem(f"{path}:{where}", _unparsed(error))
            return
        yield RawRecord(f"{path}:{line_at(position)}", value)
        position = whitespace.match(text, end).end()
        first = False


def _not_text(cells: Iterable[str | None]) -> str | None:
    """Why cells read from a CSV file are not text, if they are not: bytes that are not
    UTF-8 (read as escapes, so the rows after them are still read) or a NUL byte (a
    binary or UTF-16 file)."""
    joined = "".join(filter(None, cells))  # a row short of fields has None for the rest
    if UNDECODED.search(joined):
        return NOT_UTF8
    if "\0" in joined:
        return "a NUL byte in text (is this a binary or UTF-16 file? save it as UTF-8)"
    return None


def _csv(path: Path) -> SourceFile:
    # a byte-order mark (Excel) is no column name
    handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(handle)
    try:
        columns = tuple(reader.fieldnames or ())
        reason = _not_text(columns)
    except csv.Error as error:
        columns, reason = (), f"malformed CSV: {error}"
    if reason:
        handle.close()
        return SourceFile(iter([Problem(f"{path}:1", reason)]), ())

    def records() -> Iterator[RawRecord | Problem]:
        with handle:
            while True:
                start = reader.line_num + 1  # a quoted cell may span lines: report where the row starts
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as error:
                    yield Problem(f"{path}:{start}", f"malformed CSV: {error}")
                    return
                if None in row:
                    yield Problem(f"{path}:{start}", f"more fields than the {len(columns)} columns of the header")
                elif reason := _not_text(row.values()):
                    yield Problem(f"{path}:{start}", reason)
                else:
                    yield RawRecord(f"{path}:{start}", row)

    return SourceFile(records(), columns)


def _unreadable(path: Path, what: str, error: Exception) -> DataError:
    """A file or folder that cannot be read at all (it has no line to name), with the reader's reason on one line."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return DataError(f"{path}: {what} ({reason})")


def _parquet(path: Path) -> SourceFile:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:  # a damaged column chunk is a bare OSError
        raise _unreadable(path, "not a Parquet file, or a damaged one", error) from None
    return SourceFile(_rows(path, table.to_pylist()), tuple(table.column_names))


def _datasets_folder(path: Path) -> SourceFile:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
    ) as error:  # what datasets raises on a missing, damaged or foreign file in it
        raise _unreadable(path, "not a folder written by datasets' save_to_disk, or a damaged one", error) from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict needs a 'train' split (found: {', '.join(dataset)})")
        dataset = dataset["train"]
    return SourceFile(_rows(path, dataset), tuple(dataset.column_names))


def _rows(path: Path, rows: Any) -> Iterator[RawRecord]:
    for number, row in enumerate(rows, start=1):
        yield RawRecord(f"{path}:{number}", row)
