"""Canonical records -> token ids and labels, checked, truncated and cached on disk.

Each record is rendered with the chat template and cut into trained and untrained
pieces (``ChatFormat.segments``); each piece is tokenised on its own, without special
tokens added, so the prompt tokens are exactly those the model gets at inference.
Labels are the ids of trained pieces and ``IGNORE`` elsewhere. Given ``max_length``, a
record is tokenised only as far as a few times that, from a prefix of its text: a record
of megabytes costs what a long one does, and its first tokens are those of the whole.

Tokenisation runs once per (data files, tokenizer, template, max_length, ...): the
result is stored under the cache folder and the next run loads it instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from modelloop.artifacts import atomic_file, sha256_path
from modelloop.chat import ChatFormat, TemplateError
from modelloop.data.labels import IGNORE
from modelloop.data.media import BY_NAME, Media, MediaTokens, record_media
from modelloop.data.records import Example, Records, read_records
from modelloop.data.sources import DataError, DataSource, Problem
from modelloop.paths import cache_home

#: Bump when the encoding changes, so old cache entries are not reused.
ENCODING_VERSION = 2
BATCH = 1024
SHOWN_PROBLEMS = 20
#: A sequence is tokenised as far as this many times max_length: its length is exact up
#: to there and "more than" beyond.
MEASURED = 4
#: Characters of text first tokenised per token wanted (a token is 3-4 on average).
CHARS_PER_TOKEN = 8
#: Tokens wanted past the last one kept: where the text was cut, its last word may
#: tokenise otherwise than in the whole text.
MARGIN = 64

Truncation = Literal["truncate", "drop", "error"]


@dataclass(frozen=True)
class Encoded:
    """One sequence's tokens; ``cut`` when it is longer and tokenising stopped here."""

    input_ids: list[int]
    labels: list[int]
    media: tuple[Media, ...] = ()
    cut: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    def measured(self) -> str:
        """The length for a message: ``more than N`` for a sequence cut at N tokens."""
        return f"more than {len(self)}" if self.cut else str(len(self))

    def cut_at(self, limit: int) -> Encoded:
        """Its first ``limit`` tokens, marked ``cut`` when there are more."""
        return (
            self if len(self) <= limit else Encoded(self.input_ids[:limit], self.labels[:limit], self.media, cut=True)
        )


class Encoder:
    """Renders and tokenises canonical records of every kind; with ``media`` (a
    multimodal model's ``MediaTokens``) each mark becomes its kind's placeholder and the
    kind's token is repeated once per feature of the item."""

    def __init__(self, tokenizer: Any, chat: ChatFormat | None, media: MediaTokens | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.media = media

    def _chat(self) -> ChatFormat:
        if self.chat is None:
            raise DataError("conversation data needs a chat template, and none was resolved")
        return self.chat

    def pieces(self, example: Example) -> list[list[tuple[str, bool]]]:
        """The ``(text, trained)`` pieces of each sequence a record stands for
        (a preference pair stands for two: prompt + chosen, prompt + rejected)."""
        record = example.record
        if example.kind == "text":
            return [[(record["text"] + (self.tokenizer.eos_token or ""), True)]]
        chat = self._chat()
        if example.kind == "conversation":
            return [self._placed(chat.segments(record["messages"], record.get("tools")), record)]
        if example.kind == "prompt":
            return [self._placed([(chat.render(record["prompt"], add_generation_prompt=True), False)], record)]
        if example.kind == "preference":
            return [
                self._placed(chat.segments([*record["prompt"], *record[side]]), record)
                for side in ("chosen", "rejected")
            ]
        return [self._placed(chat.segments([*record["prompt"], *record["completion"]]), record)]

    def _placed(self, pieces: list[tuple[str, bool]], record: Any) -> list[tuple[str, bool]]:
        """Marks replaced by the model's placeholders (a model refuses a kind it does not take)."""
        media = record_media(record)
        if not media:
            return pieces
        refused = media[0].kind if self.media is None else self.media.refused(media)
        if refused is not None:
            kind = BY_NAME[refused]
            model = "a vision-language" if refused == "image" else f"an {refused}-language"
            raise TemplateError(f"the record has {kind.column}, and this model takes none (choose {model} model)")
        assert self.media is not None
        return [(self.media.place(text), trained) for text, trained in pieces]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added: through the Rust tokenizer
        transformers itself calls, when there is one (skipping its per-text Python work)."""
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, examples: Sequence[Example], max_length: int | None = None) -> list[list[Encoded] | Problem]:
        """Each example's sequences, tokenised in batches; a record the template cannot
        render becomes a Problem at its location. With ``max_length``, a sequence longer
        than ``MEASURED`` times that is cut there, before it is tokenised whole."""
        pieces: list[list[list[tuple[str, bool]]] | Problem] = []
        for example in examples:
            try:
                pieces.append(self.pieces(example))
            except TemplateError as error:
                pieces.append(Problem(example.location, str(error)))
        rendered = [sequence for sequences in pieces if not isinstance(sequences, Problem) for sequence in sequences]
        tokenised = iter(self._tokenised(rendered, None if max_length is None else MEASURED * max_length))
        encoded: list[list[Encoded] | Problem] = []
        for example, sequences in zip(examples, pieces):
            if isinstance(sequences, Problem):
                encoded.append(sequences)
                continue
            encoded.append(self._with_media(example, [next(tokenised) for _ in sequences]))
        return encoded

    def each(
        self, examples: Sequence[Example], max_length: int | None = None
    ) -> Iterator[tuple[Example, list[Encoded] | Problem]]:
        """Each example with what ``encode`` makes of it, ``BATCH`` examples at a time."""
        for start in range(0, len(examples), BATCH):
            batch = examples[start : start + BATCH]
            yield from zip(batch, self.encode(batch, max_length))

    def _tokenised(self, sequences: list[list[tuple[str, bool]]], limit: int | None) -> list[Encoded]:
        """Each sequence's tokens and labels; with ``limit``, its first ``limit`` tokens
        only, from a prefix of its text grown until it gives ``MARGIN`` more than that."""
        if limit is None:
            return self._joined(sequences)
        chars = CHARS_PER_TOKEN * (limit + MARGIN)
        encoded = self._joined([_prefix(sequence, chars) for sequence in sequences])
        for index, sequence in enumerate(sequences):
            wanted, size = chars, sum(len(text) for text, _ in sequence)
            while len(encoded[index]) < limit + MARGIN and wanted < size:  # text of many characters a token
                wanted *= 2
                (encoded[index],) = self._joined([_prefix(sequence, wanted)])
            encoded[index] = encoded[index].cut_at(limit)
        return encoded

    def _joined(self, sequences: list[list[tuple[str, bool]]]) -> list[Encoded]:
        """Each sequence's pieces tokenised (all in one batch) and joined, labelled where trained."""
        ids = iter(self.token_ids([text for sequence in sequences for text, _ in sequence]))
        encoded = []
        for sequence in sequences:
            input_ids: list[int] = []
            labels: list[int] = []
            for _, trained in sequence:
                piece = next(ids)
                input_ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
            encoded.append(Encoded(input_ids, labels))
        return encoded

    def _with_media(self, example: Example, sequences: list[Encoded]) -> list[Encoded] | Problem:
        """Each item's tokens expanded; for a multimodal model also checks that a record
        without items holds no media token (typed into its text, it would have no features).
        A cut record is left as it is: its text may hold only some of its items, and it
        is too long to keep with them anyway."""
        media = record_media(example.record)
        if self.media is None:
            return sequences
        if any(sequence.cut for sequence in sequences):
            return [replace(sequence, media=media) for sequence in sequences]
        try:
            expansions = self.media.expansions(media)
            return [
                Encoded(*self.media.expand(sequence.input_ids, sequence.labels, media, expansions), media=media)
                for sequence in sequences
            ]
        except ValueError as error:
            return Problem(example.location, str(error))


def _prefix(sequence: list[tuple[str, bool]], chars: int) -> list[tuple[str, bool]]:
    """The pieces of a sequence's first ``chars`` characters."""
    cut = []
    for text, trained in sequence:
        if chars <= 0:
            break
        cut.append((text[:chars], trained))
        chars -= len(text)
    return cut


@dataclass
class DataStats:
    """What preparing the data did, for the run's manifest and the user."""

    examples: int = 0
    skipped_bad: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    media: dict[str, int] = field(default_factory=dict)  # items of each kind: {"image": 3}
    formats: dict[str, str] = field(default_factory=dict)

    def count_media(self, media: Sequence[Media]) -> None:
        for item in media:
            self.media[item.kind] = self.media.get(item.kind, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.examples} examples", f"{self.tokens} tokens ({self.trained_tokens} trained)"]
        parts += [f"{count} {BY_NAME[kind].column}" for kind, count in self.media.items()]
        for label, count in (
            ("truncated", self.truncated),
            ("dropped", self.dropped),
            ("bad records skipped", self.skipped_bad),
        ):
            if count:
                parts.append(f"{count} {label}")
        return ", ".join(parts)


class Ragged(Sequence[Any]):
    """Variable-length rows stored as one flat array and offsets; a row is a view."""

    def __init__(self, values: Any, offsets: Any) -> None:
        self.values = values
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.values[self.offsets[index] : self.offsets[index + 1]]


@dataclass
class TokenizedData:
    """Training-ready sequences: ids, labels, and where each came from.

    Tokens are kept in flat int32 arrays with offsets (a tenth of the memory of Python
    lists); ``input_ids[i]`` and ``labels[i]`` are numpy views of one sequence, and
    ``media[i]`` its media items (read when batched).
    """

    flat_ids: Any
    flat_labels: Any
    offsets: Any
    locations: list[str]
    stats: DataStats
    from_cache: bool = False
    media: list[tuple[Media, ...]] | None = None  # each sequence's media items, when any has one

    @property
    def input_ids(self) -> Ragged:
        return Ragged(self.flat_ids, self.offsets)

    @property
    def labels(self) -> Ragged:
        return Ragged(self.flat_labels, self.offsets)

    @property
    def lengths(self) -> list[int]:
        import numpy

        return numpy.diff(self.offsets).tolist()


def problems_error(problems: Sequence[Problem], hint: str) -> DataError:
    shown = [str(problem) for problem in problems[:SHOWN_PROBLEMS]]
    if len(problems) > SHOWN_PROBLEMS:
        shown.append(f"... and {len(problems) - SHOWN_PROBLEMS} more")
    return DataError(f"{len(problems)} bad record(s):\n" + "\n".join(shown) + f"\n{hint}")


def too_long(location: str, encoded: Encoded, max_length: int) -> Problem:
    """A record that ``truncation="error"`` refuses."""
    return Problem(location, f"{encoded.measured()} tokens, longer than max_length {max_length}")


def fit(encoded: Encoded, max_length: int, truncation: Truncation) -> Encoded | None:
    """The sequence within ``max_length``: cut, or None when dropped (or nothing trained is left)."""
    if len(encoded) > max_length:
        if truncation != "truncate" or encoded.media:  # a cut through an item's tokens would not match its features
            return None
        encoded = Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length])
    if all(label == IGNORE for label in encoded.labels):
        return None
    return encoded


def tokenize_records(
    examples: Sequence[Example], encoder: Encoder, *, max_length: int, truncation: Truncation
) -> tuple[TokenizedData, list[Problem]]:
    """Encode conversation or text examples into training sequences within ``max_length``;
    also returns the records that could not be rendered."""
    from array import array

    import numpy

    stats = DataStats()
    flat_ids, flat_labels, offsets = array("i"), array("i"), array("q", [0])
    locations: list[str] = []
    media: list[tuple[Media, ...]] = []
    refused: list[Problem] = []
    unrendered: list[Problem] = []
    for example, sequences in encoder.each(examples, max_length):
        if isinstance(sequences, Problem):
            unrendered.append(sequences)
            continue
        (encoded,) = sequences
        if len(encoded) > max_length and truncation == "error":
            refused.append(too_long(example.location, encoded, max_length))
            continue
        kept = fit(encoded, max_length, truncation)
        if kept is None:
            stats.dropped += 1
            continue
        stats.truncated += len(kept) < len(encoded)
        flat_ids.extend(kept.input_ids)
        flat_labels.extend(kept.labels)
        offsets.append(len(flat_ids))
        locations.append(example.location)
        media.append(encoded.media)
        stats.count_media(encoded.media)
        stats.longest = max(stats.longest, len(kept))
    if refused:
        raise problems_error(refused, "Raise --max-length, or choose --truncation truncate or drop.")
    labels = numpy.frombuffer(flat_labels, dtype=numpy.int32)
    stats.examples = len(locations)
    stats.tokens = len(flat_ids)
    stats.trained_tokens = int(numpy.count_nonzero(labels != IGNORE))
    data = TokenizedData(
        numpy.frombuffer(flat_ids, dtype=numpy.int32),
        labels,
        numpy.frombuffer(offsets, dtype=numpy.int64),
        locations,
        stats,
        media=media if any(media) else None,
    )
    return data, unrendered


# --------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def cache_key(sources: Sequence[DataSource], encoder: Encoder, settings: dict[str, Any]) -> str:
    """Everything the tokenised result depends on: file paths (sampling is seeded by path)
    and contents, the tokenizer, the template, the settings, and the versions of the
    kernel and of every plugin (a format's ``convert`` may change with its version)."""
    from modelloop.plugins import get_plugin_manager
    from modelloop.version import __version__

    chat = encoder.chat
    described = {
        "version": ENCODING_VERSION,
        "modelloop": __version__,
        "plugins": {name: info.version for name, info in get_plugin_manager().info.items()},
        "files": [[str(s.path.resolve()), sha256_path(s.path), s.ratio, s.format] for s in sources],
        "tokenizer": tokenizer_fingerprint(encoder.tokenizer),
        "chat": [chat.source, list(chat.end_of_turn), dict(chat.options), dict(chat.special_tokens)] if chat else None,
        **settings,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save(path: Path, data: TokenizedData) -> None:
    """Write atomically: a killed run never leaves a half-written entry behind."""
    import numpy

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"locations": data.locations, "stats": asdict(data.stats)}).encode()
    with atomic_file(path, "wb") as out:
        numpy.savez(
            out,
            ids=data.flat_ids,
            labels=data.flat_labels,
            offsets=data.offsets,
            meta=numpy.frombuffer(meta, dtype=numpy.uint8),
        )


def _load(path: Path) -> TokenizedData:
    import numpy

    with numpy.load(path) as stored:
        meta = json.loads(stored["meta"].tobytes().decode())
        return TokenizedData(
            stored["ids"],
            stored["labels"],
            stored["offsets"],
            meta["locations"],
            DataStats(**meta["stats"]),
            from_cache=True,
        )


# --------------------------------------------------------------------------- the whole pipeline


def prepare_data(
    sources: Iterable[str | Path | DataSource],
    tokenizer: Any,
    chat: ChatFormat | None,
    *,
    max_length: int,
    kind: Literal["conversation", "text"] = "conversation",
    format: str | None = None,
    truncation: Truncation = "truncate",
    skip_bad_records: bool = False,
    seed: int = 0,
    use_cache: bool = True,
    media: MediaTokens | None = None,
) -> TokenizedData:
    """Read, validate, render, tokenise and (once) cache training data.

    Every record is validated first: any bad one stops here with ``file:line: reason``
    for each, unless ``skip_bad_records`` (then they are counted in ``stats``). For a
    multimodal model (``media``) nothing is cached: the media files are not part of the
    cache key.
    """
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}")
    parsed = [DataSource.parse(source) for source in sources]
    for source in parsed:
        if not source.path.exists():
            raise DataError(f"{source.path}: no such file or folder")
    encoder = Encoder(tokenizer, chat if kind == "conversation" else None, media)
    use_cache = use_cache and media is None
    settings = {
        "max_length": max_length,
        "kind": kind,
        "format": format,
        "truncation": truncation,
        "skip_bad": skip_bad_records,
        "seed": seed,
    }
    cached = cache_home() / "tokenized" / f"{cache_key(parsed, encoder, settings)}.npz" if use_cache else None
    if cached is not None and cached.exists():
        return _load(cached)
    hint = "Fix them, or pass --skip-bad-records to train without them."
    records: Records = read_records(parsed, format=format, kinds=(kind,), seed=seed)
    if records.problems and not skip_bad_records:
        raise problems_error(records.problems, hint)
    data, unrendered = tokenize_records(records.examples, encoder, max_length=max_length, truncation=truncation)
    if unrendered and not skip_bad_records:
        raise problems_error(unrendered, hint)
    data.stats.skipped_bad = len(records.problems) + len(unrendered)
    data.stats.formats = {str(path): name for path, name in records.formats.items()}
    if not data.locations:
        files = ", ".join(str(source.path) for source in parsed)
        why = data.stats.summary() if records.examples or records.problems else "no records"
        raise DataError(f"no usable examples in {files} ({why})")
    if cached is not None:
        _save(cached, data)
    return data
