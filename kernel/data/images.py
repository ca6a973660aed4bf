"""Pictures: read from a path, a base64 ``data:`` URL or (where a caller allows it) a
remote URL, and sent on as a data URL. Where pictures sit in records and requests, and
how a model takes them: ``modelloop.data.media``.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from modelloop.data.locations import readable


def open_image(reference: str) -> Any:
    """The image as an RGB PIL image; ValueError naming the image when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(readable(reference)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError) as error:
        shown = reference[:40] + "..." if reference.startswith("data:") else reference
        raise ValueError(f"cannot read image {shown}: {error}") from None


def data_url(image: Any) -> str:
    """An opened image as a base64 PNG data URL (how it travels to an engine)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
