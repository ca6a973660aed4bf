"""``python -m modelloop``: the same as the ``modelloop`` command."""

from modelloop.cli import console

console()
