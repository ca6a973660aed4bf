"""Finding plugins: the built-ins first, then every installed entry point of group ``modelloop``.

Nothing happens at import time: ``get_plugin_manager()`` builds the manager on first
use. Each third-party plugin is loaded in its own ``try``; a plugin that cannot be
imported, declares a kernel range that excludes this kernel, or implements a hook that
does not exist is reported once on stderr and skipped, and the rest keep working.

Environment:

``MODELLOOP_LOAD_PLUGINS=a,b``
    load only these installed plugins (distribution or entry-point names); an empty
    value loads none. Built-ins are always loaded.
``MODELLOOP_BLOCK_PLUGINS=a,b``
    never load these (built-ins included, by their module name).
``MODELLOOP_TRACE_PLUGINS=1``
    print every hook call and its result to stderr.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from modelloop import hooks
from modelloop.version import __version__

ENTRY_POINT_GROUP = "modelloop"

#: Modules under ``modelloop.builtin`` registered before any third-party plugin,
#: exactly like one: the kernel is built on its own hooks.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "templates",
    "data_formats",
    "samplers",
    "generic_family",
    "full_tuner",
    "parallel",
    "hf_engine",
    "exporters",
    "rewards",
    "environments",
)

#: The plugin distributions released with the kernel (``plugins/`` in its repository).
#: Their names, like the built-ins', cannot be taken over by another plugin.
FIRST_PARTY_PLUGINS: frozenset[str] = frozenset(
    f"modelloop-plugin-{name}"
    for name in (
        "accel-liger",
        "engine-llamacpp",
        "engine-lmdeploy",
        "engine-sglang",
        "engine-vllm",
        "eval-evalscope",
        "eval-lm-eval",
        "export-gguf",
        "model-deepseek",
        "model-gemma",
        "model-glm",
        "model-gpt-oss",
        "model-internvl",
        "model-llama",
        "model-llava",
        "model-mixtral",
        "model-phi",
        "model-qwen",
        "parallel-deepspeed",
        "parallel-megatron",
        "reward-safety",
        "tuner-galore",
        "tuner-lora",
    )
)


def canonical_name(name: str) -> str:
    """A distribution name as pip compares them (``Modelloop_Plugin.X`` -> ``modelloop-plugin-x``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _names_from_env(environ: Mapping[str, str], variable: str) -> set[str] | None:
    value = environ.get(variable)
    if value is None:
        return None
    return {canonical_name(part) for part in value.split(",") if part.strip()}


#: Who stands behind a plugin, highest standing first: it decides who keeps a name
#: two plugins register (``modelloop.registry``).
ORIGINS = ("built-in", "first-party", "third-party")


@dataclass(frozen=True)
class PluginInfo:
    """What ``modelloop plugins`` says about one loaded plugin."""

    name: str
    version: str
    builtin: bool

    @property
    def origin(self) -> str:
        """One of ``ORIGINS``."""
        if self.builtin:
            return "built-in"
        return "first-party" if self.name.split(":")[0] in FIRST_PARTY_PLUGINS else "third-party"


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus what modelloop needs: plugin versions and problem reports."""

    def __init__(self) -> None:
        super().__init__(hooks.PROJECT)
        self.add_hookspecs(hooks)
        self.info: dict[str, PluginInfo] = {}
        self.problems: list[str] = []
        self.registries: dict[str, Any] = {}
        #: plugin name -> the CLI commands it added (filled by ``modelloop.cli.build_cli``).
        self.commands: dict[str, list[str]] = {}
        self._tracing = False

    def report(self, plugin: str, version: str, reason: str) -> None:
        """Tell the user, once, what of a plugin was left out and why."""
        self.warn(f"plugin {plugin} {version}: {reason} (kernel: modelloop {__version__})")

    def warn(self, problem: str) -> None:
        """Print a loading problem on stderr, once per process."""
        message = f"modelloop: {problem}"
        if message not in self.problems:
            self.problems.append(message)
            print(message, file=sys.stderr)

    def add_plugin(self, plugin: object, info: PluginInfo) -> bool:
        """Register one plugin object; on a contract violation report it and leave it out."""
        try:
            self.register(plugin, name=info.name)
            self.check_pending()
        except (pluggy.PluginValidationError, ValueError) as error:
            if self.get_plugin(info.name) is plugin:
                self.unregister(name=info.name)
            reason = str(error).splitlines()[0] if isinstance(error, ValueError) else str(error)
            self.report(info.name, info.version, f"not loaded: {reason}")
            return False
        self.info[info.name] = info
        return True

    def implementations(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """Each plugin's implementation of a hook, in the order the plugins were loaded.

        Provider hooks are called plugin by plugin rather than through pluggy's
        one-shot call, so the kernel knows who registered what and can skip one
        plugin's contribution without losing the others'.
        """
        loaded = {name: position for position, name in enumerate(self.info)}
        found = []
        for impl in sorted(
            getattr(self.hook, hook_name).get_hookimpls(), key=lambda i: loaded.get(i.plugin_name, len(loaded))
        ):
            if impl.hookwrapper or impl.wrapper:
                version = self.info[impl.plugin_name].version if impl.plugin_name in self.info else "unknown"
                self.report(impl.plugin_name, version, f"{hook_name} ignored: a provider hook cannot be a wrapper")
                continue

            def call(_impl: Any = impl, **kwargs: Any) -> Any:
                arguments = {name: kwargs[name] for name in _impl.argnames}
                self.trace_call(f"{_impl.plugin_name}.{hook_name}", arguments)
                result = _impl.function(**arguments)
                if self._tracing:
                    print(f"modelloop trace: {_impl.plugin_name}.{hook_name} returned {result!r}", file=sys.stderr)
                return result

            found.append((impl.plugin_name, call))
        return found

    def enable_trace(self) -> None:
        """Print every hook call to stderr (``MODELLOOP_TRACE_PLUGINS=1``)."""
        self._tracing = True

        def before(hook_name: str, impls: Any, kwargs: Mapping[str, Any]) -> None:
            names = ", ".join(impl.plugin_name for impl in impls)
            self.trace_call(f"{hook_name} -> [{names}]", kwargs)

        def after(outcome: Any, hook_name: str, impls: Any, kwargs: Any) -> None:
            print(f"modelloop trace: {hook_name} returned {outcome.get_result()!r}", file=sys.stderr)

        self.add_hookcall_monitoring(before, after)

    def trace_call(self, what: str, arguments: Mapping[str, Any]) -> None:
        if self._tracing:
            shown = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
            print(f"modelloop trace: {what}({shown})", file=sys.stderr)


def _kernel_incompatibility(distribution: metadata.Distribution) -> str | None:
    """The reason a plugin's declared ``modelloop`` range excludes this kernel, if it does."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in distribution.requires or ():
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if canonical_name(requirement.name) != "modelloop":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if not requirement.specifier.contains(__version__, prereleases=True):
            return f"it requires modelloop{requirement.specifier}"
    return None


def _api_incompatibility(plugin: object) -> str | None:
    """The reason a plugin's ``PLUGIN_API`` range (``">=1.0,<2"``, the versions of
    ``modelloop.plugin`` it was written against) excludes this kernel's, if it does."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    from modelloop.plugin import API_VERSION

    needed = getattr(plugin, "PLUGIN_API", None)
    if needed is None:
        return None
    try:
        if SpecifierSet(str(needed)).contains(API_VERSION):
            return None
    except InvalidSpecifier:
        return f"its PLUGIN_API {needed!r} is not a version range like '>=1.0,<2'"
    return f"it is written for plugin API {needed}, and this modelloop has {API_VERSION}"


def _entry_points() -> list[metadata.EntryPoint]:
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(found, key=lambda ep: (canonical_name(ep.dist.name) if ep.dist else "", ep.name))


def _load_builtins(manager: PluginManager, blocked: set[str]) -> set[str]:
    """Load the built-ins not blocked; returns the names each can be blocked by."""
    known = set()
    for module_name in BUILTIN_PLUGINS:
        qualified = f"modelloop.builtin.{module_name}"
        known |= {canonical_name(qualified), canonical_name(module_name)}
        if canonical_name(qualified) in blocked or canonical_name(module_name) in blocked:
            continue
        module = importlib.import_module(qualified)
        manager.add_plugin(module, PluginInfo(qualified, __version__, builtin=True))
    return known


def _load_entry_points(
    manager: PluginManager, entry_points: Iterable[metadata.EntryPoint], selected: set[str] | None, blocked: set[str]
) -> set[str]:
    """Load the installed plugins the settings allow; returns the names each can be chosen by."""
    known = set()
    for entry_point in entry_points:
        distribution = entry_point.dist
        dist_name = canonical_name(distribution.name) if distribution else canonical_name(entry_point.name)
        version = distribution.version if distribution else "unknown"
        names = {dist_name, canonical_name(entry_point.name)}
        known |= names
        if (selected is not None and not names & selected) or names & blocked:
            continue
        if dist_name in manager.info:  # a second entry point of one distribution
            dist_name = f"{dist_name}:{entry_point.name}"
        reason = _kernel_incompatibility(distribution) if distribution else None
        if reason:
            manager.report(dist_name, version, f"not loaded: {reason}")
            continue
        try:
            plugin = entry_point.load()
        except (Exception, SystemExit) as error:  # any import-time failure of third-party code
            manager.report(dist_name, version, f"not loaded: import failed: {type(error).__name__}: {error}")
            continue
        reason = _api_incompatibility(plugin)
        if reason:
            manager.report(dist_name, version, f"not loaded: {reason}")
            continue
        manager.add_plugin(plugin, PluginInfo(dist_name, version, builtin=False))
    return known


def make_plugin_manager(
    environ: Mapping[str, str] | None = None,
    entry_points: Iterable[metadata.EntryPoint] | None = None,
) -> PluginManager:
    """Build a manager with the built-ins and the installed plugins the environment allows.

    :param environ: where to read ``MODELLOOP_*_PLUGINS`` from (default ``os.environ``).
    :param entry_points: the entry points to consider (default: every installed one).
    """
    environ = os.environ if environ is None else environ
    manager = PluginManager()
    if environ.get("MODELLOOP_TRACE_PLUGINS", "") not in ("", "0"):
        manager.enable_trace()
    blocked = _names_from_env(environ, "MODELLOOP_BLOCK_PLUGINS") or set()
    selected = _names_from_env(environ, "MODELLOOP_LOAD_PLUGINS")
    known = _load_builtins(manager, blocked)
    known |= _load_entry_points(manager, _entry_points() if entry_points is None else entry_points, selected, blocked)
    for variable, names in (("MODELLOOP_LOAD_PLUGINS", selected), ("MODELLOOP_BLOCK_PLUGINS", blocked)):
        unknown = sorted((names or set()) - known)
        if unknown:  # a typo here would otherwise load or block nothing, silently
            manager.warn(f"{variable} names {', '.join(unknown)}, which no installed plugin is called")
    return manager


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager, built on first use."""
    global _manager
    if _manager is None:
        _manager = make_plugin_manager()
    return _manager


def set_plugin_manager(manager: PluginManager | None) -> PluginManager | None:
    """Replace the process-wide manager (tests, embedding); returns the previous one."""
    global _manager
    previous, _manager = _manager, manager
    return previous
