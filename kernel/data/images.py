"""Images in conversations: where they come from, how they are checked, and how their
place in the text is marked.

A canonical record keeps its images beside its messages (``"images": [...]``, in order
of appearance) and marks each one's place in the message text with ``IMAGE_MARK``. The
formats accept OpenAI-style content parts (``{"type": "image_url", ...}``,
``{"type": "image", "image": PATH}``), which become marks here, or text with ``<image>``
placeholders and an ``images`` column. An image is a local path (relative to the data
file) or a base64 ``data:`` URL; remote URLs are fetched only where a caller allows it
(serving, with ``allow_remote``), never while reading training data.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Where an image goes in message text; a vision family's placeholder replaces it.
IMAGE_MARK = "<image>"

REMOTE = ("http://", "https://")


def take_image_parts(messages: Any) -> tuple[Any, list[str]]:
    """Messages whose content is a list of parts, as text with ``IMAGE_MARK`` where each
    image part was, and the images in order. Anything else is returned as it came."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return messages, []
    images: list[str] = []
    flattened = []
    for number, item in enumerate(messages, start=1):
        content = item.get("content") if isinstance(item, Mapping) else None
        if not isinstance(content, list):
            flattened.append(item)
            continue
        text = []
        for part_number, part in enumerate(content, start=1):
            where = f"messages[{number}].content[{part_number}]"
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                text.append(str(part.get("text", "")))
            elif kind in ("image_url", "image"):
                images.append(_part_image(part, kind, where))
                text.append(IMAGE_MARK)
            else:
                raise ValueError(f"{where}: unknown content part type {kind!r} (expected text, image_url or image)")
        flattened.append({**item, "content": "".join(text)})
    return flattened, images


def _part_image(part: Mapping[str, Any], kind: str, where: str) -> str:
    value = part.get(kind)
    if isinstance(value, Mapping):  # {"image_url": {"url": ...}}
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: an {kind} part needs a path or URL")
    return value


def count_marks(texts: Sequence[str]) -> int:
    return sum(text.count(IMAGE_MARK) for text in texts)


def resolve_image(reference: str, base: Path | None, *, allow_remote: bool = False) -> str:
    """A path made absolute (relative to ``base``), or a data/remote URL as given.
    ValueError when a local image does not exist or a remote one is not allowed."""
    if reference.startswith("data:"):
        return reference
    if reference.startswith(REMOTE):
        if not allow_remote:
            raise ValueError(
                f"image {reference[:80]}: remote URLs are not fetched (use a local path or a base64 data URL)"
            )
        return reference
    path = Path(reference.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ValueError(f"image {reference}: no such file")
    return str(path.resolve())


def open_image(reference: str) -> Any:
    """The image as an RGB PIL image; ValueError naming the image when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        if reference.startswith("data:"):
            header, _, payload = reference.partition(",")
            if ";base64" not in header:
                raise ValueError("only base64 data URLs are read")
            source: Any = io.BytesIO(base64.b64decode(payload, validate=True))
        elif reference.startswith(REMOTE):
            source = io.BytesIO(_fetch(reference))
        else:
            source = reference
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError) as error:
        shown = reference[:40] + "..." if reference.startswith("data:") else reference
        raise ValueError(f"cannot read image {shown}: {error}") from None


def _fetch(url: str) -> bytes:
    import httpx

    response = httpx.get(url, timeout=30, follow_redirects=True)
    response.raise_for_status()
    return response.content


def _opened(picture: Any) -> Any:
    return open_image(picture) if isinstance(picture, str) else picture


def data_url(image: Any) -> str:
    """An opened image as a base64 PNG data URL (how it travels to an engine)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def check_record_images(record: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """The record with its images resolved and each one opened once; ValueError when an
    image is missing or unreadable, or the marks and the images do not pair up. A record
    without pictures is left as it is (a literal ``<image>`` in text stays text)."""
    images = record.get("images") or []
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        raise ValueError("images must be a list of paths or data URLs")
    if not images:
        return record
    marks = count_marks(record_texts(record))
    if marks != len(images):
        raise ValueError(f"{marks} {IMAGE_MARK} placeholder(s) but {len(images)} image(s)")
    if count_marks(answer_texts(record)):
        raise ValueError("pictures go in the prompt, not in the answers")
    resolved = [resolve_image(image, base) for image in images]
    for image in resolved:
        open_image(image)
    return {**record, "images": resolved}


def record_texts(
    record: Mapping[str, Any], keys: Sequence[str] = ("messages", "prompt", "chosen", "rejected", "completion")
) -> list[str]:
    """Every message text of a canonical record (where its image marks are)."""
    texts = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, list):
            texts += [item.get("content") or "" for item in value if isinstance(item, Mapping)]
    return texts


def answer_texts(record: Mapping[str, Any]) -> list[str]:
    """The texts of a preference or KTO record's answers (which hold no pictures)."""
    return record_texts(record, ("chosen", "rejected", "completion"))


class ImageTokens:
    """One vision-language model's images: how many image tokens each takes in its text,
    and the pixel inputs for a batch (``VisionSpec.image_inputs`` with its processor)."""

    def __init__(self, spec: Any, image_processor: Any, model_config: Any, tokenizer: Any) -> None:
        self.spec = spec
        self.image_processor = image_processor
        self.model_config = model_config
        self.image_token_id = tokenizer.convert_tokens_to_ids(spec.image_token)

    def counts(self, pictures: Sequence[Any]) -> list[int]:
        """Image tokens per picture (a path, a data URL, or an opened image)."""
        if not pictures:
            return []
        _, counts = self.spec.image_inputs(
            self.image_processor, [_opened(picture) for picture in pictures], self.model_config
        )
        return list(counts)

    def inputs(self, pictures: Sequence[Any]) -> dict[str, Any]:
        """Model inputs for these pictures (paths, data URLs or opened images), in order
        (none for none)."""
        if not pictures:
            return {}
        inputs, _ = self.spec.image_inputs(
            self.image_processor, [_opened(picture) for picture in pictures], self.model_config
        )
        return dict(inputs)

    def expand(self, input_ids: list[int], labels: list[int], counts: Sequence[int]) -> tuple[list[int], list[int]]:
        """Each image token repeated as many times as its image has features (never trained)."""
        from modelloop.data.labels import IGNORE

        found = input_ids.count(self.image_token_id)
        if found != len(counts):
            raise ValueError(f"the rendered text holds {found} image token(s) for {len(counts)} image(s)")
        ids: list[int] = []
        kept: list[int] = []
        images = iter(counts)
        for token, label in zip(input_ids, labels):
            if token == self.image_token_id:
                count = next(images)
                ids += [token] * count
                kept += [IGNORE] * count
            else:
                ids.append(token)
                kept.append(label)
        return ids, kept

    def expand_ids(self, input_ids: list[int], counts: Sequence[int]) -> list[int]:
        """``expand`` for a prompt, whose labels nobody needs."""
        return self.expand(input_ids, input_ids, counts)[0]


def as_content_parts(messages: Sequence[Mapping[str, Any]], images: Sequence[str]) -> list[dict[str, Any]]:
    """Messages whose image marks become OpenAI parts holding the record's pictures (in
    order): the form an engine request takes. Messages without marks are left as text."""
    pictures = iter(images)
    converted = []
    for item in messages:
        content = item.get("content")
        if not isinstance(content, str) or IMAGE_MARK not in content:
            converted.append(dict(item))
            continue
        parts: list[dict[str, Any]] = []
        for number, text in enumerate(content.split(IMAGE_MARK)):
            if number:
                parts.append({"type": "image_url", "image_url": {"url": next(pictures)}})
            if text:
                parts.append({"type": "text", "text": text})
        converted.append({**item, "content": parts})
    return converted


def inline_images(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every local picture sent as a base64 data URL, which any engine
    (this one, or vLLM and SGLang over HTTP) reads."""
    inlined = []
    for item in messages:
        content = item.get("content")
        if isinstance(content, list):
            content = [_inlined(part) for part in content]
        inlined.append({**item, "content": content})
    return inlined


def _inlined(part: Mapping[str, Any]) -> Mapping[str, Any]:
    url = (part.get("image_url") or {}).get("url", "") if part.get("type") == "image_url" else ""
    if not url or url.startswith(("data:", *REMOTE)):
        return part
    import mimetypes

    kind = mimetypes.guess_type(url)[0] or "image/png"
    return {
        "type": "image_url",
        "image_url": {"url": f"data:{kind};base64," + base64.b64encode(Path(url).read_bytes()).decode()},
    }
