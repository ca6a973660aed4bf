"""A model's parameters by the family's module groups (``ModelFamily.module_groups``).

Groups are named by module-name prefixes, and one group may sit inside another (Qwen-VL's
merger inside its vision tower): a parameter belongs to the group with the longest
prefix it starts with. Names are matched as the base model has them, whatever wrapper
(PEFT) is around it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: what PEFT puts in front of the base model's parameter names.
WRAPPER_PREFIXES = ("base_model.model.",)


def group_of(name: str, groups: Mapping[str, tuple[str, ...]]) -> str | None:
    """The group ``name`` (a parameter or module name) belongs to, or None."""
    for prefix in WRAPPER_PREFIXES:
        name = name.removeprefix(prefix)
    best, length = None, -1
    for group, prefixes in groups.items():
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > length:
                best, length = group, len(prefix)
    return best


def check_groups(names: list[str], groups: Mapping[str, tuple[str, ...]], family_name: str) -> None:
    """ValueError naming the first group that is not one of the family's."""
    unknown = [name for name in names if name not in groups]
    if unknown:
        raise ValueError(
            f"the {family_name} family has no module group {unknown[0]!r}; groups: {', '.join(groups) or 'none'}"
        )


def parameter_groups(model: Any, groups: Mapping[str, tuple[str, ...]]) -> dict[str | None, list[tuple[str, Any]]]:
    """``group -> [(name, parameter)]`` for every parameter (None: in no group)."""
    found: dict[str | None, list[tuple[str, Any]]] = {}
    for name, parameter in model.named_parameters():
        found.setdefault(group_of(name, groups), []).append((name, parameter))
    return found


def freeze(model: Any, groups: Mapping[str, tuple[str, ...]], names: list[str]) -> None:
    """Stop training every parameter of the named groups (adapters on them too)."""
    for name, parameter in model.named_parameters():
        if group_of(name, groups) in names:
            parameter.requires_grad = False


def describe(
    model: Any, groups: Mapping[str, tuple[str, ...]], rates: Mapping[str, float], lr: float
) -> dict[str, dict[str, Any]]:
    """Per group: its parameters, how many train, and at what rate (for the log and the
    manifest); parameters in no group are listed as ``other``."""
    summary: dict[str, dict[str, Any]] = {}
    for group, members in parameter_groups(model, groups).items():
        trainable = sum(parameter.numel() for _, parameter in members if parameter.requires_grad)
        summary[group or "other"] = {
            "parameters": sum(parameter.numel() for _, parameter in members),
            "trainable": trainable,
            "lr": rates.get(group, lr) if trainable and group is not None else (lr if trainable else 0.0),
        }
    return summary
