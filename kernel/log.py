"""One-line notices on stderr, each said once per process."""

from __future__ import annotations

import sys

_said: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``modelloop: warning: message`` unless it was printed already."""
    if message not in _said:
        _said.add(message)
        print(f"modelloop: warning: {message}", file=sys.stderr)


#: Libraries that log at import time about optional speed-ups a machine lacks (bitsandbytes
#: asks for the ``kernels`` package on every CPU with AVX512-BF16); their errors still show.
QUIET_LIBRARIES = ("bitsandbytes",)


def quiet_library_notices() -> None:
    """Keep the terminal to modelloop's own lines: library warnings below error are dropped."""
    import logging

    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
