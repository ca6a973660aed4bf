"""Errors a user can act on.

Every ``ModelloopError`` is a mistake the user made or a condition they can fix (an
unknown name, a bad option, a broken plugin). The CLI prints its message as one line
and exits with code 2; a traceback is shown only with ``--debug``. Anything that is
not a ``ModelloopError`` is a bug in modelloop or a plugin and keeps its traceback.
"""

from __future__ import annotations

import importlib.util
from typing import Any


class ModelloopError(Exception):
    """Base class of every error the CLI reports without a traceback."""


class UnknownNameError(ModelloopError, LookupError):
    """A name (tuner, model family, reward, ...) that no installed plugin registered."""


class EngineError(ModelloopError):
    """A request an engine cannot serve as asked: an unknown model, a prompt too long."""


class PluginError(ModelloopError):
    """A plugin broke its side of the contract (wrong type registered, hook raised)."""


class ModelLoadError(ModelloopError):
    """A model or tokenizer that cannot be loaded as asked."""


class MissingLibraryError(ModelloopError):
    """A tuner, accelerator, strategy or exporter needs a library this environment lacks."""


def require_libraries(spec: Any, kind: str) -> None:
    """Refuse ``spec`` (any spec with ``requires``: the import names it needs) in one line
    when one of its libraries is not installed, before anything is loaded for it."""
    for module in spec.requires:
        if importlib.util.find_spec(module) is None:
            raise MissingLibraryError(f"the {spec.name} {kind} needs {module}: pip install {module}")
