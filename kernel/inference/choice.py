"""``--engine auto``: the installed engine that runs fastest here, by the engines' own word.

Each engine that can start in this process with nothing set up ranks itself for this
machine (``Engine.preference``): the built-in ``hf`` at 0, llama.cpp above it on a CPU.
Servers launched with a set-up of their own (vLLM, SGLang) do not rank themselves and
are chosen by name.
"""

from __future__ import annotations

from modelloop.errors import EngineError
from modelloop.registry import ENGINES, get_registry
from modelloop.specs import Engine

#: The engine name that asks for the fastest engine installed.
AUTO = "auto"


def find_engine(name: str) -> Engine:
    """The engine registered as ``name``; for ``auto``, the one that ranks highest here
    (the first registered among equals)."""
    engines = get_registry(ENGINES)
    if name != AUTO:
        return engines.get(name)
    ranked = [(engine.preference(), engine) for engine in engines if engine.preference is not None]
    ranked = [(rank, engine) for rank, engine in ranked if rank is not None]
    if not ranked:
        raise EngineError("no installed engine ranks itself for --engine auto here: name one with --engine")
    return max(ranked, key=lambda pair: pair[0])[1]


def check_engine_name(name: str) -> None:
    """Refuse a name ``find_engine`` would not take, without ranking the engines: ranking
    asks each one, which may import its libraries, and a config's fast checks import none."""
    if name != AUTO:
        get_registry(ENGINES).get(name)
