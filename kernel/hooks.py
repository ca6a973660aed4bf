"""The plugin contract: every hook modelloop calls, grouped by phase.

A plugin is a module (or object) with functions decorated ``@modelloop.hookimpl`` whose
names are hooks below. An implementation may take any subset of a hook's arguments.

Provider hooks receive a ``register`` callback owned by the kernel: the kernel checks
the type of what is registered, rejects duplicate names (naming both plugins) and
isolates a plugin whose hook raises. They are called lazily, the first time a registry
is used, so they must be cheap: no torch, no model loading, only building specs whose
callables import what they need when called.

Lifecycle hooks observe a stage as it runs (trackers, notifications). Their return
values are ignored; an exception in one is a bug in that plugin and propagates.

This file is versioned with the kernel: plugins declare the kernel versions they work
with in their ``modelloop`` dependency, and the kernel skips an installed plugin whose
range excludes it (see ``modelloop.plugins``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

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
        Tuner,
    )

PROJECT = "modelloop"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- models and data


@hookspec
def register_models(register: Callable[[ModelFamily], None]) -> None:
    """Register model families.

    Called the first time a model is resolved (loading, ``new-model``, ``plugins``).

    :param register: call ``register(ModelFamily(...))`` once per family. A family is
        found by its name, its aliases and each ``config.model_type`` it claims.
    """


@hookspec
def register_templates(register: Callable[[ChatTemplate], None]) -> None:
    """Register chat templates.

    Called the first time a template is looked up, by name or through a family.

    :param register: call ``register(ChatTemplate(...))`` once per template.
    """


@hookspec
def register_dataset_formats(register: Callable[[DatasetFormat], None]) -> None:
    """Register record formats that become conversations, preference pairs or prompts.

    Called the first time a data file is read or checked. A file's format is the first
    registered format whose ``matches(record)`` is true, unless the user names one.

    :param register: call ``register(DatasetFormat(...))`` once per format.
    """


@hookspec
def register_samplers(register: Callable[[Sampler], None]) -> None:
    """Register data samplers: the order and grouping in which examples are drawn.

    Called the first time a training stage builds its data loader.

    :param register: call ``register(Sampler(...))`` once per sampler.
    """


# --------------------------------------------------------------------------- training


@hookspec
def register_tuners(register: Callable[[Tuner], None]) -> None:
    """Register tuners: how a model's parameters are trained (full, LoRA, GaLore, ...).

    Called the first time a tuner is resolved, which a training stage does before it
    loads the model so that a missing library fails fast.

    :param register: call ``register(Tuner(...))`` once per tuner.
    """


@hookspec
def register_accelerators(register: Callable[[Accelerator], None]) -> None:
    """Register accelerators: faster kernels swapped into a loaded model (Liger, ...).

    Called when a training stage resolves ``accelerators``, before the model loads, so
    a missing library, a missing GPU or an unsupported model type fails fast.

    :param register: call ``register(Accelerator(...))`` once per accelerator.
    """


@hookspec
def register_parallel_strategies(register: Callable[[ParallelStrategy], None]) -> None:
    """Register parallel strategies: how a model is spread over processes.

    Called when a stage or ``modelloop plan`` resolves ``--strategy``.

    :param register: call ``register(ParallelStrategy(...))`` once per strategy.
    """


@hookspec
def register_rewards(register: Callable[[Reward], None]) -> None:
    """Register reward functions and reward models (also usable as eval metrics).

    Called when an alignment stage, an eval or a recipe check resolves a reward name.
    ``Reward.score`` is checked for a ``(prompts, completions, **columns)`` signature
    when it is registered.

    :param register: call ``register(Reward(...))`` once per reward.
    """


@hookspec
def register_environments(register: Callable[[Environment], None]) -> None:
    """Register environments: worlds GRPO's model acts in over several turns, with tools.

    Called when an alignment stage or a recipe check resolves ``--environment``, before
    any model loads; the environment's options and data columns are checked then, and
    one episode is stepped on the first record.

    :param register: call ``register(Environment(...))`` once per environment.
    """


# --------------------------------------------------------------------------- export and serving


@hookspec
def register_exporters(register: Callable[[Exporter], None]) -> None:
    """Register exporters: run -> merged, quantized or engine-specific weights.

    Called when ``modelloop export`` resolves ``--quant`` / ``--for``.

    :param register: call ``register(Exporter(...))`` once per exporter.
    """


@hookspec
def register_engines(register: Callable[[Engine], None]) -> None:
    """Register inference engines (the built-in ``hf`` one, vLLM, SGLang, ...).

    Called when ``serve``, ``infer``, ``chat``, ``eval`` or a GRPO rollout resolves
    ``--engine``.

    :param register: call ``register(Engine(...))`` once per engine.
    """


# --------------------------------------------------------------------------- evaluation


@hookspec
def register_eval_backends(register: Callable[[EvalBackend], None]) -> None:
    """Register evaluation back ends: benchmark harnesses (lm-evaluation-harness, EvalScope).

    Called when ``modelloop eval --benchmark`` or a recipe's eval stage with ``benchmarks``
    resolves ``--backend``, before any model loads.

    :param register: call ``register(EvalBackend(...))`` once per back end.
    """


# --------------------------------------------------------------------------- command line


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``modelloop`` command line.

    Called once each time the CLI starts, before arguments are parsed, so keep the
    module that implements it light (import heavy libraries inside the command).

    :param cli: the root click group; decorate functions with ``@cli.command()``.
    """


# --------------------------------------------------------------------------- stage lifecycle


@hookspec
def before_stage(stage: str, config: Mapping[str, Any], run_dir: Path) -> None:
    """Called when a stage starts, after its config is resolved, before any work.

    :param stage: the stage name (``sft``, ``rlhf``, ``export``, ...).
    :param config: the resolved configuration, as plain data.
    :param run_dir: the folder the stage writes its artifacts and manifest to (``export``:
        the export's folder, written when the stage ends; ``serve``, which writes no folder:
        the model it serves, as given).
    """


@hookspec
def after_stage(stage: str, config: Mapping[str, Any], run_dir: Path, result: Mapping[str, Any]) -> None:
    """Called when a stage has finished and written its run folder.

    :param stage: the stage name.
    :param config: the resolved configuration.
    :param run_dir: the stage's run folder.
    :param result: what the stage returned (final metrics, artifact paths).
    """


@hookspec
def on_stage_error(stage: str, config: Mapping[str, Any], run_dir: Path, error: BaseException) -> None:
    """Called when a stage fails, before the error reaches the user.

    :param stage: the stage name.
    :param config: the resolved configuration.
    :param run_dir: the stage's run folder (it may be incomplete).
    :param error: the exception that stopped the stage, including KeyboardInterrupt.
    """


@hookspec
def on_log(stage: str, step: int, metrics: Mapping[str, float], run_dir: Path) -> None:
    """Called each time a stage logs metrics (training loss, rewards, throughput).

    :param stage: the stage name.
    :param step: the global step the metrics belong to.
    :param metrics: metric name -> value.
    :param run_dir: the stage's run folder.
    """


#: Every hook this contract defines, by name.
HOOK_NAMES: tuple[str, ...] = tuple(
    sorted(name for name, value in list(globals().items()) if hasattr(value, f"{PROJECT}_spec"))
)
