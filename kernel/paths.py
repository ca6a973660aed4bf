"""Where modelloop keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$MODELLOOP_CACHE``, else ``$XDG_CACHE_HOME/modelloop``, else ``~/.cache/modelloop``."""
    if os.environ.get("MODELLOOP_CACHE"):
        return Path(os.environ["MODELLOOP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "modelloop"
