"""One-line notices on stderr, each said once per process."""

from __future__ import annotations

import sys

_said: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``modelloop: warning: message`` unless it was printed already."""
    if message not in _said:
        _said.add(message)
        print(f"modelloop: warning: {message}", file=sys.stderr)
