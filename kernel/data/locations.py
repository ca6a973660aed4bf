"""Where a media item's bytes are: a local path (relative to the data file), a base64
``data:`` URL, or a remote URL fetched only where a caller allows it."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

REMOTE = ("http://", "https://")


def resolve_source(reference: str, base: Path | None, *, allow_remote: bool = False, noun: str = "image") -> str:
    """A path made absolute (relative to ``base``), or a data/remote URL as given.
    ValueError when a local item does not exist or a remote one is not allowed."""
    if reference.startswith("data:"):
        return reference
    if reference.startswith(REMOTE):
        if not allow_remote:
            raise ValueError(
                f"{noun} {reference[:80]}: remote URLs are not fetched (use a local path or a base64 data URL)"
            )
        return reference
    path = Path(reference.removeprefix("file://")).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    if not path.is_file():
        raise ValueError(f"{noun} {reference}: no such file")
    return str(path.resolve())


def readable(reference: str) -> Any:
    """What a decoder opens for a source: the path, or the bytes of a base64 data URL or
    a remote URL. ValueError for a data URL that is not base64."""
    if reference.startswith("data:"):
        header, _, payload = reference.partition(",")
        if ";base64" not in header:
            raise ValueError("only base64 data URLs are read")
        return io.BytesIO(base64.b64decode(payload, validate=True))
    if reference.startswith(REMOTE):
        import httpx

        response = httpx.get(reference, timeout=30, follow_redirects=True)
        response.raise_for_status()
        return io.BytesIO(response.content)
    return reference
