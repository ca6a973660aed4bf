"""The append-only JSON Lines files a run writes (``metrics.jsonl``, generated answers).

A process killed, or a disk filled, in the middle of a write leaves a last line without
its newline. Readers leave it out and say so; ``repair`` cuts it off before appending
resumes, so the next record does not join it. A broken line *before* the last is not a
torn write but a file changed by hand, and reading it is an error naming the line.

Records are written as strict JSON: NaN and infinity, for which JSON has no words, are
written as null, so that every JSON reader can read what modelloop writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from modelloop.errors import ModelloopError


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete records of ``path`` ([] if there is no file)."""
    return _complete(path)[0]


def repair(path: Path) -> list[dict[str, Any]]:
    """Cut a torn last line off ``path`` so appending can resume; the complete records."""
    records, size = _complete(path)
    if path.exists() and path.stat().st_size > size:
        with path.open("r+b") as handle:
            handle.truncate(size)
    return records


def write_record(out: IO[str], record: Mapping[str, Any]) -> None:
    """Append one record as a line of strict JSON."""
    out.write(json.dumps(_strict(record), ensure_ascii=False, allow_nan=False) + "\n")


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _complete(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records and the number of bytes they take."""
    from modelloop.log import warn_once

    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    size = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number == len(lines)  # no newline after it: written only in part
        try:
            if line.strip() and not last:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("a record is a JSON object")
                records.append(record)
        except (ValueError, RecursionError):
            if number < len(lines) - 1:
                raise ModelloopError(
                    f"{path}:{number}: not a JSON object, and lines were written after it: the file was changed by hand"
                ) from None
            last = True
        if last:
            if line:
                warn_once(f"{path}:{number}: the last line was cut short (a write interrupted); left out")
            break
        size += len(line) + 1
    return records, size
