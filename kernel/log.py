"""What reaches the terminal: modelloop's one-line notices, each said once per process,
and not the libraries' own chatter unless the user asks for it (``-v``, ``--debug``)."""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

_said: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``modelloop: warning: message`` unless it was printed already."""
    if message not in _said:
        _said.add(message)
        print(f"modelloop: warning: {message}", file=sys.stderr)


#: Libraries that log at import time about optional speed-ups a machine lacks (bitsandbytes
#: asks for the ``kernels`` package on every CPU with AVX512-BF16); their errors still show.
QUIET_LIBRARIES = ("bitsandbytes",)

#: Libraries whose own Python warnings (their internal deprecations, advice to their own
#: developers) tell a modelloop user nothing to act on. A warning they attribute to the
#: caller's line is not theirs to drop: it names something modelloop or a plugin does.
WARNING_LIBRARIES = (
    "accelerate",
    "bitsandbytes",
    "datasets",
    "deepspeed",
    "huggingface_hub",
    "peft",
    "torch",
    "transformers",
    "trl",
)

#: Set before the libraries read them: datasets' per-map progress bars (TRL tokenises with
#: several), and TRL's notice on every GRPO run that ``rollout_func``, which modelloop uses
#: knowingly, is experimental.
QUIET_ENVIRONMENT = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


def verbose_requested() -> bool:
    """Whether the user asked for the libraries' own output (``-v`` or ``--debug``, which
    the command line passes on to the processes it starts through the environment)."""
    return any(os.environ.get(name) for name in ("MODELLOOP_VERBOSE", "MODELLOOP_DEBUG"))


def quiet_library_notices() -> None:
    """Keep the terminal to modelloop's own lines: library warnings below error, their
    Python warnings, and the per-call progress bars of transformers (loading, writing
    weights) and datasets are dropped. A hub download keeps its bar: it is long work."""
    import logging
    import warnings

    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module=rf"({'|'.join(WARNING_LIBRARIES)})(\.|$)")
    after_import("transformers.utils.logging", lambda logging_module: logging_module.set_tqdm_hook(_no_bar))


def _no_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})


def after_import(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call ``then(module)`` once module ``name`` is imported: now if it is, else as soon as
    its import finishes (transformers is imported only by the commands that need it, and
    importing it just to configure it would cost every command half a second)."""
    if name in sys.modules:
        then(sys.modules[name])
        return
    sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: lets the other finders find ``name``, then wraps its loader so
    that ``then`` runs on the module as soon as it has executed. Removes itself on use."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = next((found for finder in sys.meta_path if (found := _spec(finder, fullname, path, target))), None)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            self.then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _spec(finder: Any, fullname: str, path: Any, target: Any) -> Any:
    find = getattr(finder, "find_spec", None)
    return find(fullname, path, target) if find else None
