"""``modelloop plan``: the parallel plan and memory per device of a training config,
before a single GPU-hour is spent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

#: flag -> config key of the training config it sets.
FLAGS = {
    "--model": ("model", str),
    "--tuner": ("tuner", str),
    "--max-length": ("max_length", int),
    "--batch-size": ("batch_size", int),
    "--grad-accum": ("grad_accum", int),
    "--nproc": ("nproc", int),
    "--nnodes": ("nnodes", int),
    "--strategy": ("strategy", str),
    "--dtype": ("dtype", click.Choice(["auto", "bf16", "fp16", "fp32"])),
}

#: ``data`` is required by a training config but does not change a plan.
NO_DATA = {"data": ["(not read by modelloop plan)"]}


def plan_command_body(
    config: Path | None,
    assignments: tuple[str, ...],
    gpu_memory: str | None,
    gradient_checkpointing: bool | None,
    **flags: Any,
) -> None:
    """Print the plan and per-device memory estimate of a training config: weights,
    gradients, optimizer states, activations and buffers, whether it fits, and the
    cheapest change that makes it fit.

    Takes the training commands' --config and --set, so a run's own config file plans
    exactly that run. --gpu-memory plans for GPUs of that size (80GiB) from any machine;
    without it, for this machine's GPU, or its memory shared by --nproc processes.
    """
    import torch

    from modelloop.config import TrainConfig, build_config, parse_assignments, read_yaml
    from modelloop.parallel.memory import parse_size
    from modelloop.parallel.planner import choose_unset, describe, plan_memory

    layers: list[dict[str, Any]] = [NO_DATA]
    if config is not None:
        layers.append(read_yaml(config))
    layers.append(parse_assignments(assignments))
    given = {FLAGS["--" + name.replace("_", "-")][0]: value for name, value in flags.items() if value is not None}
    if gradient_checkpointing is not None:
        given["gradient_checkpointing"] = gradient_checkpointing
    layers.append(given)
    settings = build_config(TrainConfig, *layers, source=str(config) if config else "options")
    cuda = gpu_memory is not None or torch.cuda.is_available()
    if gpu_memory is not None:
        try:
            capacity = parse_size(gpu_memory)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--gpu-memory") from None
    elif cuda:
        capacity = torch.cuda.get_device_properties(0).total_memory
    else:
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // settings.nproc
    if cuda:  # the settings left unset, chosen as the stage will choose them on such a GPU
        settings, chosen = choose_unset(settings, capacity)
        if chosen:
            click.echo(f"chosen     {', '.join(chosen)} (unset; the stage chooses the same)")
    for line in describe(plan_memory(settings, cuda=cuda), capacity, cuda=cuda):
        click.echo(line)


def _build() -> click.Command:
    command: Any = plan_command_body
    for flag, (_, kind) in reversed(FLAGS.items()):
        command = click.option(flag, type=kind, default=None)(command)
    command = click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None)(command)
    command = click.option("--gpu-memory", help="Memory of each GPU to plan for, e.g. 80GiB or 24GB.")(command)
    command = click.option(
        "--set", "assignments", multiple=True, help="Override a config key: --set strategy_options.stage=3."
    )(command)
    command = click.option(
        "--config", type=click.Path(dir_okay=False, path_type=Path), help="A training config (YAML)."
    )(command)
    return click.command("plan")(command)


plan_command = _build()
