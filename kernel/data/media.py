"""Pictures and sound in conversations: where they come from, how they are checked, how
their place in the text is marked, and how a model turns them into tokens and inputs.

A canonical record keeps its media beside its messages, one column per kind (``images``,
``audios``), each in order of appearance, and marks each item's place in the message text
with its kind's mark (``<image>``, ``<audio>``). The formats accept OpenAI-style content
parts (``image_url``/``image``, ``input_audio``/``audio``/``audio_url``), which become
marks here, or text with the marks and the columns. An item is a local path (relative to
the data file) or a base64 ``data:`` URL; remote URLs are fetched only where a caller
allows it (serving, with ``allow_remote``), never while reading training data.

A model takes the kinds its family declares (``VisionSpec`` for pictures, ``AudioSpec``
for sound): ``MediaTokens`` puts each kind's placeholder where its marks are, repeats
its token once per feature, and makes the model inputs of a batch's items.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from modelloop.data.locations import REMOTE, resolve_source


@dataclass(frozen=True)
class Kind:
    """One kind of media as data holds it."""

    name: str  # "image"
    column: str  # the record column holding the items: "images"
    mark: str  # where an item goes in message text: "<image>"
    parts: tuple[str, ...]  # OpenAI content part types that hold one
    url_part: str  # the part type an engine request carries it in
    noun: str  # what one is called in messages: "image", "audio clip"

    def open(self, source: Any) -> Any:
        """The item decoded (a PIL image, an audio ``Clip``, a ``Video``: every frame read,
        the first kept, so that checking a long video does not hold all of it); ValueError
        naming it."""
        if self.name == "audio":
            from modelloop.data.audio import open_audio

            return open_audio(source)
        if self.name == "video":
            from modelloop.data.video import open_video

            return open_video(source, max_frames=1)
        from modelloop.data.images import open_image

        return open_image(source)


IMAGE = Kind("image", "images", "<image>", ("image_url", "image"), "image_url", "image")
AUDIO = Kind("audio", "audios", "<audio>", ("input_audio", "audio_url", "audio"), "audio_url", "audio clip")
#: A video is a file or data URL, or a list of frames (pictures, in order).
VIDEO = Kind("video", "videos", "<video>", ("video_url", "video"), "video_url", "video")
KINDS = (IMAGE, AUDIO, VIDEO)
BY_NAME = {kind.name: kind for kind in KINDS}
BY_PART = {part: kind for kind in KINDS for part in kind.parts}
COLUMNS = tuple(kind.column for kind in KINDS)

#: Where an image goes in message text; a vision family's placeholder replaces it.
IMAGE_MARK = IMAGE.mark


class Media(NamedTuple):
    """One item of a record or request: its kind's name and its source (a path or URL, a
    video's list of frames, or the item already opened)."""

    kind: str
    source: Any


def is_source(value: Any) -> bool:
    """Whether ``value`` says where an item is (a path or URL, or a list of frames)
    rather than being the item, opened."""
    return isinstance(value, str) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(frame, str) for frame in value)
    )


def record_media(record: Mapping[str, Any]) -> tuple[Media, ...]:
    """Every item of a canonical record, kind by kind, each kind's in order."""
    return tuple(Media(kind.name, source) for kind in KINDS for source in record.get(kind.column) or ())


def take_media_parts(messages: Any) -> tuple[Any, dict[str, list[Any]]]:
    """Messages whose content is a list of parts, as text with a mark where each media
    part was, and the items by column (``{"images": [...], "audios": [...]}``, kinds
    without items left out). Anything else is returned as it came."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return messages, {}
    taken: dict[str, list[Any]] = {}
    flattened = []
    for number, item in enumerate(messages, start=1):
        content = item.get("content") if isinstance(item, Mapping) else None
        if not isinstance(content, list):
            flattened.append(item)
            continue
        text = []
        for part_number, part in enumerate(content, start=1):
            where = f"messages[{number}].content[{part_number}]"
            part_type = part.get("type") if isinstance(part, Mapping) else None
            if part_type == "text":
                text.append(str(part.get("text", "")))
            elif part_type in BY_PART:
                kind = BY_PART[part_type]
                taken.setdefault(kind.column, []).append(_part_source(part, part_type, where))
                text.append(kind.mark)
            else:
                known = ", ".join(["text", *BY_PART])
                raise ValueError(f"{where}: unknown content part type {part_type!r} (expected {known})")
        flattened.append({**item, "content": "".join(text)})
    return flattened, taken


def _part_source(part: Mapping[str, Any], part_type: str, where: str) -> str | list[str]:
    if part_type == "input_audio":  # {"input_audio": {"data": BASE64, "format": "wav"}}
        audio = part.get("input_audio")
        if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str) or not audio["data"]:
            raise ValueError(f"{where}: an input_audio part needs input_audio.data (base64) and input_audio.format")
        return f"data:audio/{audio.get('format') or 'wav'};base64,{audio['data']}"
    value = part.get(part_type)
    if isinstance(value, Mapping):  # {"image_url": {"url": ...}}
        value = value.get("url")
    if part_type == "video" and isinstance(value, list):  # a video's frames
        if not is_source(value):
            raise ValueError(f"{where}: a video part's frames are a non-empty list of paths or URLs")
        return list(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: an {part_type} part needs a path or URL")
    return value


def count_marks(texts: Sequence[str], mark: str = IMAGE_MARK) -> int:
    return sum(text.count(mark) for text in texts)


def check_record_media(record: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """The record with its media resolved and each item opened once; ValueError when an
    item is missing or unreadable, or a kind's marks and items do not pair up. A kind
    without items is left as it is (a literal ``<image>`` in text stays text)."""
    checked = dict(record)
    for kind in KINDS:
        items = record.get(kind.column) or []
        allowed = is_source if kind is VIDEO else (lambda item: isinstance(item, str))
        if not isinstance(items, list) or not all(allowed(item) for item in items):
            frames = " (a video: or a list of its frames)" if kind is VIDEO else ""
            raise ValueError(f"{kind.column} must be a list of paths or data URLs{frames}")
        if not items:
            continue
        marks = count_marks(record_texts(record), kind.mark)
        if marks != len(items):
            raise ValueError(f"{marks} {kind.mark} placeholder(s) but {len(items)} {kind.noun}(s)")
        if count_marks(answer_texts(record), kind.mark):
            raise ValueError(f"{kind.column} go in the prompt, not in the answers")
        resolved = [_resolved(item, base, kind.noun) for item in items]
        for item in resolved:
            kind.open(item)
        checked[kind.column] = resolved
    return checked


def _resolved(item: str | list[str], base: Path | None, noun: str) -> str | list[str]:
    if isinstance(item, list):
        return [resolve_source(frame, base, noun=f"{noun} frame") for frame in item]
    return resolve_source(item, base, noun=noun)


def record_texts(
    record: Mapping[str, Any], keys: Sequence[str] = ("messages", "prompt", "chosen", "rejected", "completion")
) -> list[str]:
    """Every message text of a canonical record (where its marks are)."""
    texts = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, list):
            texts += [item.get("content") or "" for item in value if isinstance(item, Mapping)]
    return texts


def answer_texts(record: Mapping[str, Any]) -> list[str]:
    """The texts of a preference or KTO record's answers (which hold no media)."""
    return record_texts(record, ("chosen", "rejected", "completion"))


def as_content_parts(messages: Sequence[Mapping[str, Any]], record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Messages whose marks become OpenAI parts holding the record's items (each kind's
    in order): the form an engine request takes. Messages without marks stay text."""
    import re

    items = {kind.mark: iter(record.get(kind.column) or ()) for kind in KINDS if record.get(kind.column)}
    if not items:
        return [dict(item) for item in messages]
    splitter = re.compile("(" + "|".join(re.escape(mark) for mark in items) + ")")
    converted = []
    for item in messages:
        content = item.get("content")
        if not isinstance(content, str) or not splitter.search(content):
            converted.append(dict(item))
            continue
        parts: list[dict[str, Any]] = []
        for piece in splitter.split(content):
            if piece in items:
                kind = next(kind for kind in KINDS if kind.mark == piece)
                source = next(items[piece])
                if isinstance(source, list):  # a video's frames
                    parts.append({"type": "video", "video": list(source)})
                else:
                    parts.append({"type": kind.url_part, kind.url_part: {"url": source}})
            elif piece:
                parts.append({"type": "text", "text": piece})
        converted.append({**item, "content": parts})
    return converted


def inline_media(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every local item sent as a base64 data URL, which any engine
    (this one, or vLLM and SGLang over HTTP) reads."""
    inlined = []
    for item in messages:
        content = item.get("content")
        if isinstance(content, list):
            content = [_inlined(part) for part in content]
        inlined.append({**item, "content": content})
    return inlined


def _inlined(part: Mapping[str, Any]) -> Mapping[str, Any]:
    part_type = part.get("type")
    if part_type == "video" and isinstance(part.get("video"), list):
        return {"type": "video", "video": [_inline_url(frame, "image/png") for frame in part["video"]]}
    fallback = {"image_url": "image/png", "audio_url": "audio/wav", "video_url": "video/mp4"}.get(str(part_type))
    if fallback is None:
        return part
    url = (part.get(part_type) or {}).get("url", "")
    return {"type": part_type, part_type: {"url": _inline_url(url, fallback)}} if url else part


def _inline_url(url: str, fallback: str) -> str:
    """A local file as a base64 data URL; a data or remote URL as it is."""
    if url.startswith(("data:", *REMOTE)):
        return url
    kind = mimetypes.guess_type(url)[0] or fallback
    return f"data:{kind};base64," + base64.b64encode(Path(url).read_bytes()).decode()


class KindTokens:
    """One kind of media for one model: the text that stands for an item, the token
    repeated once per feature, and the processor that makes the model inputs.

    :param inputs: ``inputs(processor, opened items, model_config) -> (model inputs,
        expansions)``, the family's: each item's expansion is how many times its token is
        repeated, or the text that replaces the token (Qwen3-VL's frames with their times).
    :param opener: ``opener(source) -> opened item`` in the form ``inputs`` takes.
    """

    def __init__(
        self,
        kind: Kind,
        *,
        placeholder: str,
        token: str,
        inputs: Callable[..., tuple[Mapping[str, Any], list[int]]],
        processor: Any,
        model_config: Any,
        tokenizer: Any,
        opener: Callable[[str], Any],
        token_type: int = 1,
    ) -> None:
        self.kind = kind
        self.placeholder = placeholder
        self.token = token
        self.token_id = tokenizer.convert_tokens_to_ids(token)
        self.tokenizer = tokenizer
        self.processor = processor
        self.model_config = model_config
        self.token_type = token_type  # its tokens' value in the family's token-type input
        self._inputs = inputs
        self._opener = opener

    def open(self, source: Any) -> Any:
        return self._opener(source) if is_source(source) else source

    def processed(self, sources: Sequence[Any]) -> tuple[dict[str, Any], list[list[int]]]:
        """The model inputs of these items and the token ids each stands for (none for none)."""
        if not sources:
            return {}, []
        inputs, expansions = self._inputs(self.processor, [self.open(source) for source in sources], self.model_config)
        return dict(inputs), [self._ids(expansion) for expansion in expansions]

    def _ids(self, expansion: int | str) -> list[int]:
        if isinstance(expansion, str):
            return self.tokenizer(expansion, add_special_tokens=False)["input_ids"]
        return [self.token_id] * int(expansion)


class MediaTokens:
    """A multimodal model's media, every kind it takes: where their placeholders go,
    how many tokens each item takes, and the model inputs of a batch's items.

    :param token_types: the model input marking each kind's tokens (Qwen-VL's
        ``mm_token_type_ids``), or None.
    :param rope_index: the family's ``rope_index`` (multimodal positions), or None.
    """

    def __init__(
        self,
        kinds: Iterable[KindTokens],
        *,
        token_types: str | None = None,
        rope_index: Callable[..., Any] | None = None,
    ) -> None:
        self.kinds = {handler.kind.name: handler for handler in kinds}
        self.token_types = token_types
        self.rope_index = rope_index

    def takes(self, kind: str) -> bool:
        return kind in self.kinds

    def refused(self, media: Iterable[Media]) -> str | None:
        """The name of the first kind among ``media`` this model does not take, or None."""
        return next((item.kind for item in media if item.kind not in self.kinds), None)

    def place(self, text: str) -> str:
        """Each mark of a kind this model takes replaced by the kind's placeholder."""
        for handler in self.kinds.values():
            text = text.replace(handler.kind.mark, handler.placeholder)
        return text

    def open(self, item: Media) -> Media:
        return Media(item.kind, self.kinds[item.kind].open(item.source))

    def counts(self, media: Sequence[Media]) -> list[int]:
        """Tokens per item, in the order of ``media``."""
        return [len(ids) for ids in self.expansions(media)]

    def expansions(self, media: Sequence[Media]) -> list[list[int]]:
        """The token ids each item stands for, in the order of ``media``."""
        return self._processed(media)[1]

    def inputs(self, media: Sequence[Media]) -> dict[str, Any]:
        """Model inputs for these items (paths, data URLs or opened), each kind's in order."""
        merged: dict[str, Any] = {}
        for inputs in self.inputs_by_kind(media).values():
            merged.update(inputs)
        return merged

    def inputs_by_kind(self, media: Sequence[Media]) -> dict[str, dict[str, Any]]:
        """``inputs`` kept apart by kind (a packed row's examples each take a slice)."""
        by_kind: dict[str, dict[str, Any]] = {}
        for name, handler in self.kinds.items():
            inputs, _ = handler.processed([item.source for item in media if item.kind == name])
            if inputs:
                by_kind[name] = inputs
        return by_kind

    def _processed(self, media: Sequence[Media]) -> tuple[dict[str, Any], list[list[int]]]:
        expansions: dict[int, list[int]] = {}
        merged: dict[str, Any] = {}
        for name, handler in self.kinds.items():
            numbers = [number for number, item in enumerate(media) if item.kind == name]
            inputs, kind_expansions = handler.processed([media[number].source for number in numbers])
            merged.update(inputs)
            expansions.update(zip(numbers, kind_expansions))
        if len(expansions) != len(media):
            raise ValueError(f"this model takes no {self.refused(media)}")
        return merged, [expansions[number] for number in range(len(media))]

    def expand(
        self, input_ids: list[int], labels: list[int], media: Sequence[Media], expansions: Sequence[list[int]]
    ) -> tuple[list[int], list[int]]:
        """Each item's token replaced by the ids it stands for (its token once per feature;
        never trained)."""
        from modelloop.data.labels import IGNORE

        per_token: dict[int, list[list[int]]] = {handler.token_id: [] for handler in self.kinds.values()}
        for item, expansion in zip(media, expansions):
            per_token[self.kinds[item.kind].token_id].append(expansion)
        for handler in self.kinds.values():
            found, wanted = input_ids.count(handler.token_id), len(per_token[handler.token_id])
            if found != wanted:
                raise ValueError(
                    f"the rendered text holds {found} {handler.kind.name} token(s) for {wanted} {handler.kind.noun}(s)"
                )
        remaining = {token: iter(values) for token, values in per_token.items()}
        ids: list[int] = []
        kept: list[int] = []
        for token, label in zip(input_ids, labels):
            if token in remaining:
                expansion = next(remaining[token])
                ids += expansion
                kept += [IGNORE] * len(expansion)
            else:
                ids.append(token)
                kept.append(label)
        return ids, kept

    def expand_ids(self, input_ids: list[int], media: Sequence[Media]) -> list[int]:
        """``expand`` for a prompt, whose labels nobody needs."""
        return self.expand(input_ids, input_ids, media, self.expansions(media))[0]

    def token_type_ids(self, input_ids: Any) -> dict[str, Any]:
        """The family's token-type input for these ids (each kind's tokens marked with
        its value), or nothing for a family without one."""
        if not self.token_types:
            return {}
        types = input_ids.new_zeros(input_ids.shape)
        for handler in self.kinds.values():
            types = types + (input_ids == handler.token_id).long() * handler.token_type
        return {self.token_types: types}
