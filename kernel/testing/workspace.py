"""Where one run of the kit keeps what it builds: tiny models, and each check's files.

Tiny models are built with ``new-model``'s code (``modelloop.models.new_model``) the
first time a check asks for a family, and kept for the rest of the run: no hub, no
network. A test suite that already builds them (modelloop's own, through its
``tiny_models`` fixture) hands its builder in instead.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Workspace:
    """A folder for one run of the kit.

    :param root: where models and files go (removed with the workspace when it is a
        temporary one).
    :param tiny_models: ``tiny_models(family_name) -> folder`` of that family's tiny
        preset, when the caller has them already; None builds them under ``root``.
    """

    def __init__(self, root: Path, tiny_models: Callable[[str], Path] | None = None) -> None:
        self.root = root
        self._tiny_models = tiny_models
        self._built: dict[str, Path] = {}
        self._numbers = itertools.count(1)

    def tiny_model(self, family: str) -> Path:
        """The folder of ``family``'s tiny preset, built on first use."""
        if self._tiny_models is not None:
            return self._tiny_models(family)
        if family not in self._built:
            from modelloop.models.new_model import new_model

            self._built[family] = new_model(family, "tiny", self.root / "models" / family)
        return self._built[family]

    def folder(self, name: str) -> Path:
        """A new empty folder for one check's files."""
        path = self.root / f"{next(self._numbers)}-{name}"
        path.mkdir(parents=True)
        return path


@contextmanager
def temporary_workspace(tiny_models: Callable[[str], Path] | None = None) -> Iterator[Workspace]:
    """A workspace in a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="modelloop-check-") as root:
        yield Workspace(Path(root), tiny_models)
