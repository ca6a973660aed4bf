"""Typed registries, one per ``register_*`` hook, filled on first use.

A registry calls its hook plugin by plugin, so it knows which plugin provides each name.
A plugin whose hook raises, registers something of the wrong type, or registers one
name twice is reported on stderr and its contribution skipped whole; the others stay.

When plugins register the same name, standing decides, never load order: a built-in
name stays the kernel's and a first-party name its plugin's (the other plugin's claim is
reported and ignored; its other names stay). Two third-party plugins claiming a name
both lose it, and looking it up fails naming both and how to block one.

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
from modelloop.plugins import ORIGINS, PluginManager, get_plugin_manager
from modelloop.specs import (
    Accelerator,
    ChatTemplate,
    DatasetFormat,
    Engine,
    Environment,
    EvalBackend,
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
    tuple((model_type, "modelloop-plugin-model-qwen") for model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"))
    + (("llama", "modelloop-plugin-model-llama"), ("mistral", "modelloop-plugin-model-llama"))
    + tuple((model_type, "modelloop-plugin-model-glm") for model_type in ("glm4", "glm"))
    + (("phi3", "modelloop-plugin-model-phi"), ("mixtral", "modelloop-plugin-model-mixtral"))
    + tuple((model_type, "modelloop-plugin-model-deepseek") for model_type in ("deepseek_v3", "deepseek_v2"))
    + (("gpt_oss", "modelloop-plugin-model-gpt-oss"), ("internvl", "modelloop-plugin-model-internvl"))
    + tuple((model_type, "modelloop-plugin-model-gemma") for model_type in ("gemma2", "gemma3_text", "gemma3")),
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
ACCELERATORS = RegistryKind(
    "accelerator", "register_accelerators", Accelerator, (("liger", "modelloop-plugin-accel-liger"),)
)
PARALLEL_STRATEGIES = RegistryKind("parallel strategy", "register_parallel_strategies", ParallelStrategy)
REWARDS = RegistryKind("reward", "register_rewards", Reward, (("safety", "modelloop-plugin-reward-safety"),))
ENVIRONMENTS = RegistryKind("environment", "register_environments", Environment)
EXPORTERS = RegistryKind("exporter", "register_exporters", Exporter)
ENGINES = RegistryKind(
    "engine",
    "register_engines",
    Engine,
    (
        ("vllm", "modelloop-plugin-engine-vllm"),
        ("sglang", "modelloop-plugin-engine-sglang"),
        ("lmdeploy", "modelloop-plugin-engine-lmdeploy"),
    ),
)
EVAL_BACKENDS = RegistryKind(
    "eval backend",
    "register_eval_backends",
    EvalBackend,
    (("lm-eval", "modelloop-plugin-eval-lm-eval"), ("evalscope", "modelloop-plugin-eval-evalscope")),
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
    ENVIRONMENTS,
    EXPORTERS,
    ENGINES,
    EVAL_BACKENDS,
)


@dataclass(frozen=True)
class Clash:
    """A name registered by several plugins, and the one that kept it (None: nobody did)."""

    kind: str
    name: str
    plugins: tuple[str, ...]
    kept: str | None

    def describe(self) -> str:
        claimants = " and ".join(self.plugins)
        if self.kept is not None:
            return f"{self.kind} {self.name!r} is registered by {claimants}; {self.kept} keeps it"
        block = " or ".join(f"MODELLOOP_BLOCK_PLUGINS={plugin.split(':')[0]}" for plugin in self.plugins)
        return (
            f"{self.kind} {self.name!r} is registered by both {claimants}, so neither is used; "
            f"uninstall one or set {block}"
        )


class Registry(Generic[S]):
    """The objects of one kind that the loaded plugins registered."""

    def __init__(self, kind: RegistryKind[S], manager: PluginManager) -> None:
        self.kind = kind
        self._manager = manager
        self._by_key: dict[str, S] | None = None
        self._providers: dict[str, str] = {}
        self._clashes: list[Clash] = []

    def get(self, name: str) -> S:
        """The object registered under ``name`` (a name, alias, or model type)."""
        by_key = self._filled()
        if name in by_key:
            return by_key[name]
        clash = next((clash for clash in self._clashes if clash.name == name and clash.kept is None), None)
        if clash is not None:
            raise PluginError(clash.describe())
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

    def clashes(self) -> list[Clash]:
        """The names more than one plugin registered, and who (if anyone) kept each."""
        self._filled()
        return list(self._clashes)

    def _filled(self) -> dict[str, S]:
        if self._by_key is None:
            claims: dict[str, list[tuple[str, S]]] = {}
            owners: dict[int, str] = {}
            for plugin, call in self._manager.implementations(self.kind.hook):
                for spec in self._staged(plugin, call):
                    owners[id(spec)] = plugin
                    for key in spec.keys():
                        claims.setdefault(key, []).append((plugin, spec))
            self._by_key = {}
            for key, claimants in claims.items():
                self._settle(key, claimants)
            for key, spec in list(self._by_key.items()):
                if self._by_key.get(spec.name) is not spec:  # a spec that lost its own name is gone
                    del self._by_key[key]
            self._providers.update((spec.name, owners[id(spec)]) for spec in self._by_key.values())
        return self._by_key

    def _staged(self, plugin: str, call: Callable[..., object]) -> list[S]:
        """One plugin's registrations, all of them or (if its hook misbehaves) none."""
        staged: list[S] = []

        def register(spec: S) -> None:
            if not isinstance(spec, self.kind.spec_type):
                raise PluginError(f"{self.kind.hook} registered {spec!r}; expected a {self.kind.spec_type.__name__}")
            staged.append(spec)

        try:
            call(register=register)
        except Exception as error:  # third-party code: isolate it
            reason = error if isinstance(error, PluginError) else f"{type(error).__name__}: {error}"
            self._report(plugin, f"{self.kind.hook} ignored: it raised {reason}")
            return []
        keys = [key for spec in staged for key in spec.keys()]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            self._report(plugin, f"{self.kind.hook} ignored: it registers {self.kind.kind} {repeated!r} twice")
            return []
        return staged

    def _settle(self, key: str, claimants: list[tuple[str, S]]) -> None:
        """Give ``key`` to the one claimant of the highest standing, or to nobody.

        A built-in name stays the kernel's and a first-party name its plugin's, whatever
        else is installed: load order (alphabetical) must not let a plugin take over
        ``lora``. Between third-party plugins there is no right answer, so neither gets
        the name and looking it up says how to choose.
        """
        assert self._by_key is not None
        standing = {plugin: ORIGINS.index(self._origin(plugin)) for plugin, _ in claimants}
        best = min(standing.values())
        winners = [(plugin, spec) for plugin, spec in claimants if standing[plugin] == best]
        if len(winners) > 1 and ORIGINS[best] == "third-party":
            self._clashes.append(Clash(self.kind.kind, key, tuple(plugin for plugin, _ in claimants), kept=None))
            return
        kept, spec = winners[0]
        self._by_key[key] = spec
        if len(claimants) > 1:
            self._clashes.append(Clash(self.kind.kind, key, tuple(plugin for plugin, _ in claimants), kept=kept))
            for plugin, _ in claimants:
                if plugin != kept:
                    self._report(
                        plugin,
                        f"its {self.kind.kind} {key!r} is ignored: the name belongs to {kept} ({self._origin(kept)})",
                    )

    def _origin(self, plugin: str) -> str:
        info = self._manager.info.get(plugin)
        return info.origin if info else "third-party"

    def _report(self, plugin: str, reason: str) -> None:
        info = self._manager.info.get(plugin)
        self._manager.report(plugin, info.version if info else "unknown", reason)


def get_registry(kind: RegistryKind[S], manager: PluginManager | None = None) -> Registry[S]:
    """The registry of one kind for a plugin manager (default: the process-wide one)."""
    manager = manager or get_plugin_manager()
    registry = manager.registries.get(kind.hook)
    if registry is None:
        registry = manager.registries[kind.hook] = Registry(kind, manager)
    return registry
