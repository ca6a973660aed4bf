"""Typed registries, one per ``register_*`` hook, filled on first use.

A registry calls its hook plugin by plugin, so it knows which plugin provides each name.
A plugin's contribution to a registry is taken whole or not at all: if its hook raises,
registers something of the wrong type, or registers a name another plugin already
holds, it is reported on stderr (naming both plugins for a clash) and skipped, and
every earlier plugin's names stay. Built-ins load first, so they win clashes.

Looking up a name nobody registered raises ``UnknownNameError`` listing what is
installed, the closest match, and the package to install when the name belongs to a
known first-party plugin.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from modelloop.errors import PluginError, UnknownNameError
from modelloop.plugins import PluginManager, get_plugin_manager
from modelloop.specs import (
    Accelerator,
    ChatTemplate,
    DatasetFormat,
    Engine,
    Exporter,
    ModelFamily,
    ParallelStrategy,
    Reward,
    Sampler,
    Spec,
    Tuner,
)

S = TypeVar("S", bound=Spec)


@dataclass(frozen=True)
class RegistryKind(Generic[S]):
    """One kind of registered object: the hook that fills it and the type it holds."""

    kind: str
    hook: str
    spec_type: type[S]
    #: name -> package for names of first-party plugins, to say what to install.
    known_providers: tuple[tuple[str, str], ...] = ()


MODELS = RegistryKind(
    "model",
    "register_models",
    ModelFamily,
    tuple(
        (model_type, "modelloop-plugin-model-qwen")
        for model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
    )
    + (("llama", "modelloop-plugin-model-llama"), ("mistral", "modelloop-plugin-model-llama")),
)
TEMPLATES = RegistryKind("template", "register_templates", ChatTemplate)
DATASET_FORMATS = RegistryKind("dataset format", "register_dataset_formats", DatasetFormat)
SAMPLERS = RegistryKind("sampler", "register_samplers", Sampler)
TUNERS = RegistryKind(
    "tuner",
    "register_tuners",
    Tuner,
    (
        ("lora", "modelloop-plugin-tuner-lora"),
        ("dora", "modelloop-plugin-tuner-lora"),
        ("qlora", "modelloop-plugin-tuner-lora"),
        ("galore", "modelloop-plugin-tuner-galore"),
    ),
)
ACCELERATORS = RegistryKind("accelerator", "register_accelerators", Accelerator, (("liger", "modelloop-plugin-accel-liger"),))
PARALLEL_STRATEGIES = RegistryKind("parallel strategy", "register_parallel_strategies", ParallelStrategy)
REWARDS = RegistryKind("reward", "register_rewards", Reward, (("safety", "modelloop-plugin-reward-safety"),))
EXPORTERS = RegistryKind("exporter", "register_exporters", Exporter)
ENGINES = RegistryKind(
    "engine",
    "register_engines",
    Engine,
    (("vllm", "modelloop-plugin-engine-vllm"), ("sglang", "modelloop-plugin-engine-sglang")),
)

KINDS: tuple[RegistryKind[Spec], ...] = (
    MODELS,
    TEMPLATES,
    DATASET_FORMATS,
    SAMPLERS,
    TUNERS,
    ACCELERATORS,
    PARALLEL_STRATEGIES,
    REWARDS,
    EXPORTERS,
    ENGINES,
)


class Registry(Generic[S]):
    """The objects of one kind that the loaded plugins registered."""

    def __init__(self, kind: RegistryKind[S], manager: PluginManager) -> None:
        self.kind = kind
        self._manager = manager
        self._by_key: dict[str, S] | None = None
        self._providers: dict[str, str] = {}

    def get(self, name: str) -> S:
        """The object registered under ``name`` (a name, alias, or model type)."""
        by_key = self._filled()
        if name in by_key:
            return by_key[name]
        raise UnknownNameError(self._unknown(name))

    def __contains__(self, name: object) -> bool:
        return name in self._filled()

    def __iter__(self) -> Iterator[S]:
        """Each registered object once, in registration order."""
        return iter({id(spec): spec for spec in self._filled().values()}.values())

    def names(self) -> list[str]:
        """The canonical names, in registration order."""
        return [spec.name for spec in self]

    def provider(self, name: str) -> str:
        """The plugin that registered ``name``."""
        return self._providers[self.get(name).name]

    def registered_by(self, plugin: str) -> list[str]:
        """The canonical names a plugin registered here."""
        return [spec.name for spec in self if self._providers[spec.name] == plugin]

    def _unknown(self, name: str) -> str:
        kind = self.kind
        installed = self.names()
        message = f"Unknown {kind.kind} {name!r}."
        close = difflib.get_close_matches(name, list(self._filled()), n=1, cutoff=0.6)
        if close:
            message += f" Did you mean {close[0]!r}?"
        package = dict(kind.known_providers).get(name)
        if package:
            message += f" It is provided by {package}: pip install {package}."
        message += f" Installed: {', '.join(installed) if installed else 'none'}."
        return message

    def _filled(self) -> dict[str, S]:
        if self._by_key is None:
            self._by_key = {}
            for plugin, call in self._manager.implementations(self.kind.hook):
                self._take(plugin, call)
        return self._by_key

    def _take(self, plugin: str, call: Callable[..., object]) -> None:
        """Add one plugin's registrations, all of them or (on any problem) none."""
        assert self._by_key is not None
        staged: list[S] = []

        def register(spec: S) -> None:
            if not isinstance(spec, self.kind.spec_type):
                raise PluginError(
                    f"{self.kind.hook} registered {spec!r}; expected a {self.kind.spec_type.__name__}"
                )
            staged.append(spec)

        version = self._manager.info[plugin].version if plugin in self._manager.info else "unknown"
        try:
            call(register=register)
        except Exception as error:  # third-party code: isolate it
            reason = error if isinstance(error, PluginError) else f"{type(error).__name__}: {error}"
            self._manager.report(plugin, version, f"{self.kind.hook} ignored: it raised {reason}")
            return
        taken: dict[str, str] = {}
        for spec in staged:
            for key in spec.keys():
                holder = self._providers.get(self._by_key[key].name) if key in self._by_key else taken.get(key)
                if holder == plugin:
                    self._manager.report(
                        plugin, version, f"{self.kind.hook} ignored: it registers {self.kind.kind} {key!r} twice"
                    )
                    return
                if holder is not None:
                    self._manager.report(
                        plugin,
                        version,
                        f"{self.kind.kind} {key!r} is registered by both {holder} and {plugin}; "
                        f"{plugin}'s {self.kind.hook} is ignored (block one with MODELLOOP_BLOCK_PLUGINS)",
                    )
                    return
                taken[key] = plugin
        for spec in staged:
            self._providers[spec.name] = plugin
            for key in spec.keys():
                self._by_key[key] = spec


def get_registry(kind: RegistryKind[S], manager: PluginManager | None = None) -> Registry[S]:
    """The registry of one kind for a plugin manager (default: the process-wide one)."""
    manager = manager or get_plugin_manager()
    registry = manager.registries.get(kind.hook)
    if registry is None:
        registry = manager.registries[kind.hook] = Registry(kind, manager)
    return registry
