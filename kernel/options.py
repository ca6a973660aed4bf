"""Checking a plugin's options (``tuner_options``, engine options, ...) the same way everywhere.

Raise ``ValueError`` with the reason; the kernel names the plugin and the config key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def complete(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over ``defaults``; a key not in ``defaults`` is refused."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; options: {', '.join(defaults)}")
    return {**defaults, **options}


def positive(options: Mapping[str, Any], name: str, kind: type = int) -> None:
    """``options[name]`` must be a positive ``kind`` (an int, or a number for float)."""
    value = options[name]
    valid = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not valid or value <= 0:
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")


def in_range(options: Mapping[str, Any], name: str, low: float, high: float) -> None:
    """``low <= options[name] < high``."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), got {value!r}")


def keyword_options(function: Callable[..., Any]) -> dict[str, Any]:
    """A function's options and their defaults: its keyword-only parameters that have
    defaults (a reward's ``score``, an environment's ``start``)."""
    import inspect

    return {
        name: parameter.default
        for name, parameter in inspect.signature(function).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is not inspect.Parameter.empty
    }
