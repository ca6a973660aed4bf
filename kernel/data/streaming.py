"""Training data read as training goes (``streaming: true``), in memory that does not
grow with the data.

A ``Stream`` reads its sources (data files, and datasets that ``datasets.load_dataset``
streams, named ``hf://org/name[:config][@split]``) a record at a time, one from each
source in turn, and validates each record as it is read. A background thread renders
and tokenises the records ``BATCH`` at a time, with the ``Encoder`` and the truncation of
the pre-tokenised path (``modelloop.data.tokenize``). Every ``buffer_size`` usable examples
make a buffer, which ``arrange`` (the stage's: packing and the sampler's order) turns into
training items as the pre-tokenised path turns the whole data. The next buffer is read
while training goes through the second half of the current one, so memory holds at most
two buffers, whatever the size of the data; data that fits one buffer gives exactly the
batches of the pre-tokenised path.

The stream never ends: once every source is read, the next pass over the data begins.
Buffer ``b`` of pass ``e`` is ordered with the seed ``seed + e + STRIDE * b`` (the first
buffer of each pass as the pre-tokenised path orders that epoch).

Where the stream stands is a ``StreamPosition``: where the buffer being trained began in
every source (the byte offset and line in a JSONL file, the record's index elsewhere, and
the pass over a source sampled ``#ratio``), the counts of what was read before it, and how
many of its items were handed out. Kept in a checkpoint (``STREAM_FILE``), it starts the
stream again at that buffer: the buffer is read, tokenised and arranged again, into the
same items in the same order, and the items already trained are skipped, so a resumed
run trains on the batches an uninterrupted one would.

A bad record is reported as ``file:line: reason`` when it is read: the stream stops there
with a DataError, or, with ``skip_bad_records``, counts it (printing the first
``SHOWN_PROBLEMS``). Bad records are counted on the first pass over the data only.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import sys
import threading
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from modelloop.data.labels import IGNORE
from modelloop.data.media import Media
from modelloop.data.records import Example, FileFormat
from modelloop.data.sources import DataError, Problem, RawRecord, open_source, read_jsonl_from
from modelloop.data.tokenize import (
    BATCH,
    SHOWN_PROBLEMS,
    DataStats,
    Encoder,
    TokenizedData,
    Truncation,
    fit,
    problems_error,
    too_long,
)

HUB = "hf://"
#: Seeds of the buffers of one pass lie this far apart.
STRIDE = 1_000_003
#: The file in a checkpoint that holds the stream's position.
STREAM_FILE = "stream.json"
POSITION_VERSION = 1
#: Records read from the start of each source before the model loads (``check_sources``).
CHECKED_RECORDS = 1000
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
SPLIT = re.compile(r"[\w.-]+")
RATIO = re.compile(r"(.+)#([0-9]*\.?[0-9]+)")
BAD_HINT = "Fix it, or pass --skip-bad-records to train without it (a streaming run stops at the first bad record)."
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def is_hub_id(text: str | Path) -> bool:
    """Whether a data source names a dataset for ``datasets.load_dataset`` (``hf://...``)."""
    return str(text).startswith(HUB)


@dataclass(frozen=True)
class HubDataset:
    """A dataset ``datasets.load_dataset`` streams: ``hf://org/name[:config][@split]``, a
    dataset on the Hugging Face hub, or a local dataset folder (``hf:///data/corpus``)."""

    text: str
    name: str
    config: str | None = None
    split: str = "train"

    @classmethod
    def parse(cls, text: str) -> HubDataset:
        """The parts of ``hf://org/name[:config][@split]`` (split ``train`` unless given)."""
        if not is_hub_id(text):
            raise DataError(f"{text}: not a hub dataset id (hf://org/name[:config][@split])")
        rest, split = text[len(HUB) :], "train"
        if "@" in rest:
            rest, _, split = rest.rpartition("@")
        name, colon, config = rest.partition(":")
        local = name.startswith(("/", "."))
        if (
            not (local or HUB_NAME.fullmatch(name))
            or (colon and not config)
            or not SPLIT.fullmatch(split)
            or any(character.isspace() for character in config)
        ):
            raise DataError(f"{text}: not a hub dataset id (hf://org/name[:config][@split], or hf:///path/to/folder)")
        return cls(text, name, config or None, split)

    def open(self) -> Any:
        """The dataset as a ``datasets.IterableDataset``; a DataError in one line when it
        cannot be had (no such dataset, config or split; no network; offline)."""
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:  # what datasets raises for each
            raise DataError(f"{self.text}: cannot stream it ({_one_line(error)}){offline_hint()}") from None


def offline_hint() -> str:
    """What to do when the hub is switched off, or nothing."""
    switched = [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")]
    if not switched:
        return ""
    return f"; {' and '.join(switched)} keep this process off the hub: unset them to stream it, or give local files"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class StreamSource:
    """A data file or hub dataset of a stream, its sampling ratio (``#0.3``, ``#2``) and
    forced format; ``label`` is how its records are located (``label:line``)."""

    label: str
    ratio: float = 1.0
    format: str | None = None
    path: Path | None = None
    hub: HubDataset | None = None

    @classmethod
    def parse(cls, text: str | Path, format: str | None = None) -> StreamSource:
        text, ratio = str(text), 1.0
        match = RATIO.fullmatch(text)
        if match:
            text, ratio = match.group(1), float(match.group(2))
            if ratio <= 0:
                raise DataError(f"{match.group(0)}: the sampling ratio must be positive")
        if is_hub_id(text):
            return cls(text, ratio, format, hub=HubDataset.parse(text))
        return cls(str(Path(text)), ratio, format, path=Path(text))


class Cursor(NamedTuple):
    """Where reading a source goes on: the passes over it done in this pass over the data
    (``#2.5`` reads a source three times, the third for a seeded half), the byte offset and
    line of its next record (JSONL), the records read in this pass, and its format once
    detected."""

    passes: int = 0
    offset: int = 0
    line: int = 1
    index: int = 0
    format: str | None = None


class _Reader:
    """One source read from a cursor: each call of ``next`` gives its next record made
    canonical (or what is wrong with it), None once it is read through."""

    def __init__(
        self,
        source: StreamSource,
        cursor: Cursor,
        *,
        allowed: Sequence[str],
        format: str | None,
        seed: int,
        hub: Callable[[StreamSource], Any],
    ) -> None:
        self.source = source
        self.cursor = cursor
        whole, self.share = divmod(source.ratio, 1.0)
        self.whole = int(whole)
        self.passes = self.whole + (self.share > 0)
        self.allowed = allowed
        self.format = source.format or format
        self.seed = seed
        self.hub = hub
        self._items: Iterator[tuple[RawRecord | Problem, int, int]] | None = None
        self._converter: FileFormat | None = None

    @property
    def ended(self) -> bool:
        return self.cursor.passes >= self.passes

    def next(self) -> Example | Problem | None:
        while not self.ended:
            if self._items is None:
                self._items = self._open()
            converter = self._converter
            assert converter is not None
            entry = next(self._items, None)
            if entry is None or converter.done:
                self._items = None
                passes = self.passes if converter.done else self.cursor.passes + 1
                self.cursor = Cursor(passes, format=self.cursor.format)
                continue
            item, offset, line = entry
            read = self.cursor
            converted = converter.convert(item)
            self.cursor = Cursor(read.passes, offset, line, read.index + 1, converter.name)
            if isinstance(converted, Problem):
                if read.passes == 0 or converter.done:  # reported on the first pass over the source
                    return converted
            elif read.passes < self.whole or self._sampled(read.index):
                return converted
        return None

    def _sampled(self, index: int) -> bool:
        """Whether the record at ``index`` is in the seeded share of the last pass."""
        return zlib.crc32(f"{self.seed}:{self.source.label}:{index}".encode()) < self.share * 2**32

    def _open(self) -> Iterator[tuple[RawRecord | Problem, int, int]]:
        """The source's records from the cursor, each with the offset and line after it
        (JSONL; elsewhere the index is what counts)."""
        source, cursor = self.source, self.cursor
        columns: Sequence[str] | None = None
        if source.hub is not None:
            items = _hub_rows(source, self.hub(source), cursor.index)
            base = Path.cwd()
        else:
            assert source.path is not None
            base = source.path.parent
            suffix = source.path.suffix.lower() if source.path.is_file() else ""
            if suffix == ".jsonl":
                items = read_jsonl_from(source.path, cursor.offset, cursor.line)
            elif suffix == ".parquet":
                items, columns = _parquet_rows(source.path, cursor.index)
            else:  # no offset to seek to: read past the records read before
                opened = open_source(source.path)
                columns = opened.columns
                items = ((item, 0, 1) for item in itertools.islice(opened.records, cursor.index, None))
        self._converter = FileFormat(
            source.label, self.format, self.allowed, columns, base=base, detected=cursor.format
        )
        return items


def _parquet_rows(path: Path, start: int) -> tuple[Iterator[tuple[RawRecord, int, int]], tuple[str, ...]]:
    """The rows of a Parquet file from the ``start``-th, read a batch at a time from the
    row group that holds it; and the file's columns."""
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as error:  # a damaged file is a bare OSError
        raise DataError(f"{path}: not a Parquet file, or a damaged one ({_one_line(error)})") from None
    metadata = parquet.metadata
    group, first = 0, 0
    while group < metadata.num_row_groups and first + metadata.row_group(group).num_rows <= start:
        first += metadata.row_group(group).num_rows
        group += 1

    def rows() -> Iterator[tuple[RawRecord, int, int]]:
        number = first
        try:
            for batch in parquet.iter_batches(batch_size=BATCH, row_groups=list(range(group, metadata.num_row_groups))):
                for row in batch.to_pylist():
                    number += 1
                    if number > start:
                        yield RawRecord(f"{path}:{number}", row), 0, 1
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"{path}: a damaged Parquet file after row {number} ({_one_line(error)})") from None

    return rows(), tuple(parquet.schema_arrow.names)


def _hub_rows(source: StreamSource, dataset: Any, start: int) -> Iterator[tuple[RawRecord, int, int]]:
    """The rows of a streamed dataset from the ``start``-th, located by their 1-based row."""
    rows = iter(dataset.skip(start) if start else dataset)
    number = start
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise DataError(f"{source.label}: reading stopped after row {number} ({_one_line(error)})") from None
        number += 1
        yield RawRecord(f"{source.label}:{number}", row), 0, 1


@dataclass(frozen=True)
class BufferStart:
    """Where a buffer begins: the pass over the data (``epoch``) and its number in that
    pass, which source's turn it is, every source's cursor, the counts of what was read
    before it, and its first record (``file:line``, for people)."""

    epoch: int
    number: int
    turn: int
    cursors: tuple[Cursor, ...]
    stats: dict[str, Any]
    location: str


@dataclass(frozen=True)
class Buffer:
    """Training items arranged from ``buffer_size`` examples, where they began, the
    counts of everything read up to their end, and the stream's settings."""

    start: BufferStart
    items: list[Any]
    stats: DataStats
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class StreamPosition:
    """The stream after the ``rows``-th item of ``buffer``."""

    buffer: Buffer
    rows: int

    def to_dict(self) -> dict[str, Any]:
        start = self.buffer.start
        return {
            "version": POSITION_VERSION,
            "epoch": start.epoch,
            "buffer": start.number,
            "rows": self.rows,
            "turn": start.turn,
            "cursors": [list(cursor) for cursor in start.cursors],
            "stats": start.stats,
            "buffer_starts_at": start.location,
            "settings": dict(self.buffer.settings),
        }


class Streamed(NamedTuple):
    """A training item and the stream's position after it."""

    item: Any
    position: StreamPosition


def read_position(checkpoint: Path) -> dict[str, Any]:
    """The stream position a checkpoint holds."""
    path = checkpoint / STREAM_FILE
    if not path.is_file():
        raise DataError(
            f"{checkpoint}: holds no position in a data stream (saved by a run without streaming): resume it without streaming"
        )
    return json.loads(path.read_text())


class _Failure(NamedTuple):
    error: BaseException


class _Builder:
    """A buffer's examples as they come: flat token arrays and offsets."""

    def __init__(self) -> None:
        self.ids = array("i")
        self.labels = array("i")
        self.offsets = array("q", [0])
        self.locations: list[str] = []
        self.media: list[tuple[Media, ...]] = []

    def __len__(self) -> int:
        return len(self.locations)

    def add(self, location: str, input_ids: list[int], labels: list[int], media: tuple[Media, ...]) -> None:
        self.ids.extend(input_ids)
        self.labels.extend(labels)
        self.offsets.append(len(self.ids))
        self.locations.append(location)
        self.media.append(media)

    def data(self) -> TokenizedData:
        import numpy

        return TokenizedData(
            numpy.frombuffer(self.ids, dtype=numpy.int32),
            numpy.frombuffer(self.labels, dtype=numpy.int32),
            numpy.frombuffer(self.offsets, dtype=numpy.int64),
            self.locations,
            DataStats(examples=len(self.locations)),
            media=self.media if any(self.media) else None,
        )


class Stream:
    """Training items from data read as training goes (see the module's docstring).

    :param arrange: ``(tokenised buffer, seed) -> training items`` in training order (the
        stage's packing and sampler).
    :param settings: what else ``arrange`` depends on (packing, batch size, sampler): a
        position saved with other settings is refused.
    :param position: a position a checkpoint saved (``StreamPosition.to_dict``): the stream
        starts there. None: at the start of the data.

    Used as a context manager: the background thread starts on entry and stops on exit.
    """

    def __init__(
        self,
        sources: Sequence[str | Path],
        encoder: Encoder,
        arrange: Callable[[TokenizedData, int], list[Any]],
        *,
        kind: str,
        max_length: int,
        buffer_size: int,
        format: str | None = None,
        truncation: Truncation = "truncate",
        skip_bad_records: bool = False,
        seed: int = 0,
        settings: Mapping[str, Any] | None = None,
        position: Mapping[str, Any] | None = None,
    ) -> None:
        if not sources:
            raise DataError("no data files given")
        self.sources = [StreamSource.parse(source) for source in sources]
        self.encoder = encoder
        self.arrange = arrange
        self.kind = kind
        self.format = format
        self.max_length = max_length
        self.truncation: Truncation = truncation
        self.skip_bad_records = skip_bad_records
        self.seed = seed
        self.buffer_size = buffer_size
        self.settings = {
            "data": [str(source) for source in sources],
            "kind": kind,
            "format": format,
            "max_length": max_length,
            "truncation": truncation,
            "seed": seed,
            "buffer_size": buffer_size,
            **(settings or {}),
        }
        self._start = (
            self._restored(position)
            if position is not None
            else BufferStart(0, 0, 0, tuple(Cursor() for _ in self.sources), asdict(DataStats()), "")
        )
        self._skip = int(position["rows"]) if position is not None else 0
        self._resumed = position is not None
        self._hub: dict[str, Any] = {}
        self._queue: queue.Queue[Buffer | _Failure] = queue.Queue(maxsize=1)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failure: _Failure | None = None
        self._wanted = threading.Event()  # set: read the next buffer
        self._wanted.set()
        self._handed = threading.Event()  # set once the first buffer (or a failure) is ready

    # ---------------------------------------------------------------- the consumer's side

    def __enter__(self) -> Stream:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> None:
        """Start reading in the background: the first buffer at once, each next one once
        training is half-way through the one before."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="modelloop-stream", daemon=True)
            self._thread.start()

    def items(self) -> Iterator[tuple[Any, Buffer, int]]:
        """Each training item, endlessly, with its buffer and its number there (from 1);
        a stream restarted from a position skips the items its first buffer had trained."""
        self.start()
        while True:
            buffer, skip = self._next_buffer()
            half = len(buffer.items) // 2
            if skip >= half:
                self._wanted.set()
            for number in range(skip, len(buffer.items)):
                if number == half:  # read the next buffer while this half is trained
                    self._wanted.set()
                yield buffer.items[number], buffer, number + 1

    def wait_ready(self) -> None:
        """Wait until the first buffer is read (training then starts with no wait for data:
        the stage's tokens/s counts training, as it does on the pre-tokenised path)."""
        self.start()
        while not self._handed.wait(0.2):
            if self._thread is not None and not self._thread.is_alive():
                return

    def _next_buffer(self) -> tuple[Buffer, int]:
        if self._failure is None:
            got = self._queue.get()
            if isinstance(got, Buffer):
                skip, self._skip = self._skip, 0
                return got, min(skip, len(got.items))
            self._failure = got
        raise self._failure.error

    def close(self) -> None:
        """Stop the background thread (it ends at its next record or buffer)."""
        self._stopping.set()
        self._wanted.set()  # wakes it if it waits
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def resumed(self) -> bool:
        """Whether the stream starts from a saved position."""
        return self._resumed

    def describe(self) -> str:
        start = self._start
        where = f", from pass {start.epoch + 1}, buffer {start.number + 1} ({start.location})" if start.location else ""
        return (
            f"streaming {', '.join(source.label for source in self.sources)}: {self.buffer_size} examples a buffer, "
            f"read, checked and tokenised as training goes{where}"
        )

    # ---------------------------------------------------------------- the background thread

    def _work(self) -> None:
        try:
            buffers = self._produce()
            while self._wait(self._wanted) and not self._stopping.is_set():
                self._wanted.clear()
                if not self._put(next(buffers)):
                    return
        except BaseException as error:  # handed to the training thread, which raises it
            self._put(_Failure(error))

    def _wait(self, event: threading.Event) -> bool:
        while not self._stopping.is_set():
            if event.wait(0.2):
                return True
        return False

    def _put(self, item: Buffer | _Failure) -> bool:
        while not self._stopping.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                self._handed.set()
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> Iterator[Buffer]:
        start = self._start
        epoch, number = start.epoch, start.number
        stats = DataStats(**start.stats)
        turn, cursors = start.turn, start.cursors
        while not self._stopping.is_set():
            readers = [self._reader(source, cursor) for source, cursor in zip(self.sources, cursors)]
            first: BufferStart | None = None
            builder = _Builder()
            records = self._records(readers, turn)
            while chunk := list(itertools.islice(records, BATCH)):
                if self._stopping.is_set():
                    return
                examples = [item for _, item in chunk if isinstance(item, Example)]
                encoded = iter(self.encoder.encode(examples, self.max_length))
                for (at_turn, at_cursors), item in chunk:
                    if first is None:
                        first = BufferStart(epoch, number, at_turn, at_cursors, asdict(stats), item.location)
                    result = next(encoded) if isinstance(item, Example) else item
                    if isinstance(result, Problem):
                        self._bad(result, stats, epoch)
                    else:
                        self._add(item.location, result[0], builder, stats)
                    if len(builder) == self.buffer_size:
                        yield self._buffer(first, builder, stats, readers)
                        number, first, builder = number + 1, None, _Builder()
            if first is not None and len(builder):
                yield self._buffer(first, builder, stats, readers)
                number += 1
            if number == 0:
                files = ", ".join(source.label for source in self.sources)
                why = stats.summary() if stats.skipped_bad or stats.dropped else "no records"
                raise DataError(f"no usable examples in {files} ({why})")
            epoch, number, turn = epoch + 1, 0, 0
            cursors = tuple(Cursor(format=reader.cursor.format) for reader in readers)

    def _records(
        self, readers: list[_Reader], turn: int
    ) -> Iterator[tuple[tuple[int, tuple[Cursor, ...]], Example | Problem]]:
        """Every record of this pass over the data, a source at a time in turn, each with
        where the stream stood before it (whose turn, every source's cursor)."""
        while not all(reader.ended for reader in readers):
            reader = readers[turn]
            before = (turn, tuple(reader.cursor for reader in readers))
            turn = (turn + 1) % len(readers)
            if reader.ended:
                continue
            item = reader.next()
            if item is not None:
                yield before, item

    def _add(self, location: str, encoded: Any, builder: _Builder, stats: DataStats) -> None:
        if len(encoded) > self.max_length and self.truncation == "error":
            raise problems_error(
                [too_long(location, encoded, self.max_length)],
                "Raise --max-length, or choose --truncation truncate or drop.",
            )
        kept = fit(encoded, self.max_length, self.truncation)
        if kept is None:
            stats.dropped += 1
            return
        stats.truncated += len(kept) < len(encoded)
        builder.add(location, kept.input_ids, kept.labels, encoded.media)
        stats.examples += 1
        stats.tokens += len(kept)
        stats.trained_tokens += len(kept.labels) - kept.labels.count(IGNORE)
        stats.longest = max(stats.longest, len(kept))
        stats.count_media(encoded.media)

    def _bad(self, problem: Problem, stats: DataStats, epoch: int) -> None:
        if not self.skip_bad_records:
            raise problems_error([problem], BAD_HINT)
        if epoch:  # counted and shown on the first pass
            return
        stats.skipped_bad += 1
        if stats.skipped_bad <= SHOWN_PROBLEMS:
            print(f"modelloop: skipped bad record {problem}", file=sys.stderr)
        elif stats.skipped_bad == SHOWN_PROBLEMS + 1:
            print("modelloop: more bad records skipped: counted in the manifest, not listed", file=sys.stderr)

    def _buffer(self, start: BufferStart, builder: _Builder, stats: DataStats, readers: list[_Reader]) -> Buffer:
        stats.formats = {reader.source.label: reader.cursor.format for reader in readers if reader.cursor.format}
        items = self.arrange(builder.data(), self.seed + start.epoch + STRIDE * start.number)
        return Buffer(start, items, DataStats(**asdict(stats)), self.settings)

    def _reader(self, source: StreamSource, cursor: Cursor) -> _Reader:
        return _Reader(
            source, Cursor(*cursor), allowed=(self.kind,), format=self.format, seed=self.seed, hub=self._hub_dataset
        )

    def _hub_dataset(self, source: StreamSource) -> Any:
        assert source.hub is not None
        if source.label not in self._hub:
            self._hub[source.label] = source.hub.open()
        return self._hub[source.label]

    # ---------------------------------------------------------------- positions

    def _restored(self, position: Mapping[str, Any]) -> BufferStart:
        """Where a saved position starts the stream; refused when it was saved for other
        data or settings (its buffers would not be these)."""
        if position.get("version") != POSITION_VERSION:
            raise DataError(f"a stream position of version {position.get('version')}; this modelloop reads version 1")
        saved = position.get("settings", {})
        for key, value in self.settings.items():
            if json.loads(json.dumps(value)) != saved.get(key):
                raise DataError(
                    f"the checkpoint's data stream was read with {key} {saved.get(key)!r}, and this run has {value!r}: "
                    "resume with the data settings it was saved with"
                )
        cursors = tuple(Cursor(*cursor) for cursor in position["cursors"])
        return BufferStart(
            position["epoch"],
            position["buffer"],
            position["turn"],
            cursors,
            dict(position["stats"]),
            position.get("buffer_starts_at", ""),
        )


def check_sources(
    sources: Sequence[str | Path], *, kind: str, format: str | None = None, skip_bad_records: bool = False
) -> None:
    """Every source opened and read up to its first usable record (at most
    ``CHECKED_RECORDS`` records), before the model loads: a missing file, a hub dataset
    that cannot be reached, a file of records of another kind, or (without
    ``skip_bad_records``) a bad record before the first good one stops the stage here."""
    hub: dict[str, Any] = {}

    def opened(source: StreamSource) -> Any:
        assert source.hub is not None
        return hub.setdefault(source.label, source.hub.open())

    if not sources:
        raise DataError("no data files given")
    for text in sources:
        source = StreamSource.parse(text)
        if source.path is not None and not source.path.exists():
            raise DataError(f"{source.path}: no such file or folder")
        reader = _Reader(source, Cursor(), allowed=(kind,), format=format, seed=0, hub=opened)
        for _ in range(CHECKED_RECORDS):
            item = reader.next()
            if item is None or isinstance(item, Example):
                break
            if not skip_bad_records:
                raise problems_error([item], BAD_HINT)
