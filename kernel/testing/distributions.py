"""Which checks a distribution gets: every spec its plugins registered, kind by kind,
and for each plugin that it registered without problems.

A distribution is named as pip names it (``modelloop-plugin-tuner-lora``); ``modelloop``
stands for the kernel's own plugins (``modelloop.builtin.*``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.plugins import canonical_name, get_plugin_manager
from modelloop.registry import (
    ACCELERATORS,
    DATASET_FORMATS,
    ENGINES,
    ENVIRONMENTS,
    EVAL_BACKENDS,
    EXPORTERS,
    KINDS,
    MODELS,
    PARALLEL_STRATEGIES,
    REWARDS,
    SAMPLERS,
    TEMPLATES,
    TUNERS,
    get_registry,
)
from modelloop.testing import (
    accelerators,
    data_formats,
    engines,
    environments,
    eval_backends,
    exporters,
    families,
    rewards,
    samplers,
    strategies,
    templates,
    tuners,
)
from modelloop.testing.kit import Broken, Check
from modelloop.testing.workspace import Workspace

KERNEL = "modelloop"

#: hook -> the checks of one spec of its kind.
CHECKS: dict[str, Callable[[Any], list[Check]]] = {
    MODELS.hook: families.checks,
    TEMPLATES.hook: templates.checks,
    DATASET_FORMATS.hook: data_formats.checks,
    SAMPLERS.hook: samplers.checks,
    TUNERS.hook: tuners.checks,
    ACCELERATORS.hook: accelerators.checks,
    PARALLEL_STRATEGIES.hook: strategies.checks,
    REWARDS.hook: rewards.checks,
    ENVIRONMENTS.hook: environments.checks,
    EXPORTERS.hook: exporters.checks,
    ENGINES.hook: engines.checks,
    EVAL_BACKENDS.hook: eval_backends.checks,
}


class UnknownDistributionError(ModelloopError):
    """A distribution that no loaded plugin comes from."""


def plugins_of(distribution: str) -> list[str]:
    """The loaded plugins that come from ``distribution``."""
    manager = get_plugin_manager()
    wanted = canonical_name(distribution)
    if wanted == KERNEL:
        return [name for name, info in manager.info.items() if info.builtin]
    found = [name for name, info in manager.info.items() if not info.builtin and name.split(":")[0] == wanted]
    if not found:
        raise UnknownDistributionError(unknown(distribution))
    return found


def loaded_distributions() -> list[str]:
    manager = get_plugin_manager()
    return sorted({KERNEL} | {name.split(":")[0] for name, info in manager.info.items() if not info.builtin})


def unknown(distribution: str) -> str:
    from importlib import metadata

    try:
        metadata.distribution(distribution)
        why = f"{distribution} is installed, and no plugin of it loaded (see above, or MODELLOOP_LOAD_PLUGINS)"
    except metadata.PackageNotFoundError:
        why = f"no loaded modelloop plugin comes from a distribution named {distribution!r}"
    return f"{why}. Loaded: {', '.join(loaded_distributions())}."


def checks_for(distribution: str) -> list[Check]:
    """Every check of what ``distribution`` registers."""
    found = []
    for plugin in plugins_of(distribution):
        for kind in KINDS:
            registry = get_registry(kind)
            for name in registry.registered_by(plugin):
                found += CHECKS[kind.hook](registry.get(name))
        found.append(Check("plugin", plugin, "registers without problems", registers_cleanly))
    return found


def registers_cleanly(plugin: str, workspace: Workspace) -> None:
    """Nothing of the plugin was left out: no hook raised, no spec was refused, no name
    was lost to another plugin."""
    lost = [
        clash.describe()
        for kind in KINDS
        for clash in get_registry(kind).clashes()
        if plugin in clash.plugins and clash.kept != plugin
    ]
    problems = [
        problem.removeprefix("modelloop: ")
        for problem in get_plugin_manager().problems
        if f"plugin {plugin} " in problem
    ]
    if problems or lost:
        raise Broken((problems or lost)[0])
