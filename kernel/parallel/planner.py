"""``modelloop plan``'s work: the plan a training config gets, its memory per device, and
the cheapest change that makes it fit when it does not.

The stages make their plan here too (``plan_training``, after ``check_tuner``), so what
``modelloop plan`` prints is the plan the run will use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from modelloop.config import ConfigError, TrainConfig, check_tuner
from modelloop.models.precision import Precision
from modelloop.parallel.memory import MIB, MemoryEstimate, ModelCounts, count_parameters, estimate
from modelloop.parallel.plan import ParallelPlan, PlanError, PlanRequest, make_plan
from modelloop.parallel.world import World, in_worker, join_process_group, torchrun_world
from modelloop.registry import TUNERS, get_registry
from modelloop.specs import ParallelStrategy


@dataclass(frozen=True)
class MemoryPlan:
    """A config's plan and what it needs per device."""

    config: TrainConfig
    plan: ParallelPlan
    counts: ModelCounts
    estimate: MemoryEstimate
    precision: Precision


@dataclass(frozen=True)
class Change:
    """A change to a config that lowers its memory, and how a user asks for it."""

    description: str
    flags: str
    update: dict[str, Any]


def plan_training(
    config: TrainConfig, model_config: Any, family: Any, *, cuda: bool | None = None
) -> tuple[ParallelStrategy, ParallelPlan]:
    """The parallel strategy and its plan for this config on the world it runs on: the
    one torchrun described to this worker, or the one ``nproc``/``nnodes`` ask for.
    ``cuda`` plans for GPUs (or not) whatever this machine has (``modelloop plan``)."""
    if in_worker():  # first, so that every collective after it (TRL's checks too) has the timeout
        join_process_group("nccl" if _cuda_available() else "gloo", config.hang_timeout)
    if cuda is None:
        cuda = _cuda_available()
        if cuda and not in_worker() and config.nproc > _cuda_devices():
            raise PlanError(f"--nproc {config.nproc}: this machine has {_cuda_devices()} GPU(s), one per process")
    try:
        world = torchrun_world() if in_worker() else World.resolve(config.nproc, config.nnodes)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    request = PlanRequest(
        world=world,
        model_config=model_config,
        family=family,
        tuner=get_registry(TUNERS).get(config.tuner),
        options=config.strategy_options,
        batch_size=config.batch_size,
        max_length=config.max_length,
        gradient_checkpointing=bool(config.gradient_checkpointing),
        cuda=cuda,
        sequence_parallel=config.sequence_parallel,
    )
    return make_plan(config.strategy, request)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def plan_memory(config: TrainConfig, *, cuda: bool | None = None) -> MemoryPlan:
    """The plan for ``config`` on its world and the memory it needs per device."""
    import torch

    from modelloop.models.loading import read_config, resolve_family, resolve_model_source
    from modelloop.models.output_loss import reason_plan_keeps_it

    tuner, options = check_tuner(config)
    model_config = read_config(
        resolve_model_source(config.model, weights=False).base, trust_remote_code=config.trust_remote_code
    )
    family = resolve_family(model_config.model_type)
    strategy, plan = plan_training(config, model_config, family, cuda=cuda)
    counts = count_parameters(model_config, tuner, options, family, trust_remote_code=config.trust_remote_code)
    on_gpu = torch.cuda.is_available() if cuda is None else cuda
    # a strategy with its own training loop keeps its own precision (megatron: the weights'
    # dtype, its optimizer's fp32 master copy counted by the plan's master_weights)
    precision = (
        Precision.resolve(config.dtype, cuda=on_gpu) if strategy.train is None else Precision(config.dtype, mixed=False)
    )
    needed = estimate(
        plan,
        counts,
        model_config,
        dtype=precision.compute,
        batch_size=config.batch_size,
        max_length=config.max_length,
        gradient_checkpointing=bool(config.gradient_checkpointing),
        mixed=precision.mixed,
        loss_in_output_layer=reason_plan_keeps_it(plan) is None,
    )
    return MemoryPlan(config, plan, counts, needed, precision)


#: The share of a GPU's memory a plan may fill when the stage chooses its settings: the
#: estimate leaves out the CUDA context, the allocator's fragmentation and the libraries' buffers.
FILL = 0.85


def choose_unset(config: TrainConfig, capacity: int) -> tuple[TrainConfig, list[str]]:
    """On a GPU, the memory settings the user left unset, chosen from the plan: gradient
    checkpointing off unless the plan needs it, and rows per micro-batch halved (with the
    accumulation doubled, the same global batch) until it fits ``FILL`` of ``capacity``.
    Returns the config to run and what was chosen, in words. ``modelloop plan`` and the
    stage both call it, so they agree."""
    free_checkpointing = config.gradient_checkpointing is None
    free_batch = not {"batch_size", "grad_accum"} & config.model_fields_set
    if not free_checkpointing and not free_batch:
        return config, []
    settled = config.model_copy(update={"gradient_checkpointing": False}) if free_checkpointing else config
    budget = capacity * FILL

    def fits(candidate: TrainConfig) -> bool:
        return plan_memory(candidate, cuda=True).estimate.total <= budget

    tries = [settled]
    if free_checkpointing:
        tries.append(settled.model_copy(update={"gradient_checkpointing": True}))
    if free_batch:
        batch, accumulation = settled.batch_size, settled.grad_accum
        while batch > 1:
            batch, accumulation = batch // 2, accumulation * 2
            tries.append(tries[-1].model_copy(update={"batch_size": batch, "grad_accum": accumulation}))
    chosen = next((candidate for candidate in tries if fits(candidate)), tries[-1])
    said = []
    if free_checkpointing:
        said.append(f"gradient checkpointing {'on' if chosen.gradient_checkpointing else 'off'}")
    if free_batch and chosen.batch_size != config.batch_size:
        said.append(f"batch {chosen.batch_size} x {chosen.grad_accum} accumulated")
    return chosen, said


def changes(planned: MemoryPlan, cuda: bool) -> Iterator[Change]:
    """Changes that lower memory, cheapest in throughput first: sharding costs
    communication, recomputation a third more compute, a smaller micro-batch some
    utilisation, offload host transfers; QLoRA changes what is trained."""
    config, plan = planned.config, planned.plan
    if plan.world.size > 1 and plan.shard < 3:
        yield Change(
            "shard weights, gradients and optimizer states over the ranks",
            "--strategy fsdp",
            {"strategy": "fsdp", "strategy_options": {}},
        )
    if not config.gradient_checkpointing and not plan.activation_checkpointing:
        yield Change(
            "recompute activations in the backward pass", "--gradient-checkpointing", {"gradient_checkpointing": True}
        )
    batch, accumulation = config.batch_size, config.grad_accum
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        yield Change(
            "a smaller micro-batch, the same global batch",
            f"--batch-size {batch} --grad-accum {accumulation}",
            {"batch_size": batch, "grad_accum": accumulation},
        )
    if cuda and plan.world.size > 1 and "optimizer" not in plan.offload:
        yield Change(
            "keep weights and optimizer states in host memory",
            "--strategy fsdp --set strategy_options.offload=true",
            {"strategy": "fsdp", "strategy_options": {"offload": True}},
        )
    tuners = get_registry(TUNERS)
    if "qlora" in tuners and tuners.get(config.tuner).load_options is None:  # the base is not quantized yet
        yield Change(
            "train LoRA adapters on a 4-bit base (QLoRA)", "--tuner qlora", {"tuner": "qlora", "tuner_options": {}}
        )


def suggest(planned: MemoryPlan, capacity: int, *, cuda: bool) -> tuple[list[Change], MemoryPlan] | None:
    """The cheapest single change that fits; else the changes in order of cost, added one
    at a time until the plan fits; None if even all of them do not."""
    candidates = list(changes(planned, cuda))
    for change in candidates:
        tried = _try(planned.config, [change], cuda)
        if tried is not None and tried.estimate.total <= capacity:
            return [change], tried
    taken: list[Change] = []
    for change in candidates:
        taken.append(change)
        tried = _try(planned.config, taken, cuda)
        if tried is not None and tried.estimate.total <= capacity:
            return _essential(taken), tried
    return None


def _essential(taken: list[Change]) -> list[Change]:
    """Only the last micro-batch change counts: each one replaces the one before."""
    last_batch = max((i for i, change in enumerate(taken) if "batch_size" in change.update), default=None)
    return [change for i, change in enumerate(taken) if "batch_size" not in change.update or i == last_batch]


def _try(config: TrainConfig, taken: list[Change], cuda: bool) -> MemoryPlan | None:
    update: dict[str, Any] = {}
    for change in taken:
        update.update(change.update)
    try:
        return plan_memory(config.model_copy(update=update), cuda=cuda)
    except (PlanError, ValueError):
        return None


def describe(planned: MemoryPlan, capacity: int, *, cuda: bool) -> list[str]:
    """``modelloop plan``'s report: the plan, the memory table, the verdict and the advice."""
    counts, needed = planned.counts, planned.estimate
    lines = [
        f"model      {planned.config.model}: {counts.total / 1e6:,.1f}M parameters, {counts.trainable / 1e6:,.2f}M trained ({planned.config.tuner})",
        *planned.plan.lines(),
        f"compute        {planned.precision.describe()}",
        "",
        f"memory per {'GPU' if cuda else 'process'} (estimate, batch {planned.config.batch_size} x {planned.config.max_length} tokens)",
    ]
    for name, value in (
        ("weights", needed.weights),
        ("gradients", needed.gradients),
        ("optimizer", needed.optimizer),
        ("activations", needed.activations),
        ("buffers", needed.buffers),
    ):
        lines.append(f"  {name:<12}{value / MIB:>12,.1f} MiB")
    share = needed.total / capacity
    lines.append(f"  {'total':<12}{needed.total / MIB:>12,.1f} MiB of {capacity / MIB:,.0f} MiB ({share:.0%})")
    if needed.total <= capacity:
        lines.append("fits")
        return lines
    lines.append(f"does not fit: {needed.total / MIB - capacity / MIB:,.0f} MiB over")
    found = suggest(planned, capacity, cuda=cuda)
    if found is None:
        lines.append("no change modelloop knows makes it fit: use more or larger devices")
        return lines
    taken, after = found
    lines.append(f"cheapest change that fits ({after.estimate.total / MIB:,.1f} MiB):")
    lines.extend(f"  {change.flags:<48}{change.description}" for change in taken)
    return lines
