"""``modelloop plan``'s work: the plan a training config gets, its memory per device, and
the cheapest change that makes it fit when it does not.

It goes through the stage's own checks (``check_tuner``, ``plan_training``), so what it
prints is the plan the run will use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from modelloop.config import TrainConfig
from modelloop.parallel.memory import MIB, MemoryEstimate, ModelCounts, count_parameters, estimate
from modelloop.parallel.plan import ParallelPlan, PlanError


@dataclass(frozen=True)
class MemoryPlan:
    """A config's plan and what it needs per device."""

    config: TrainConfig
    plan: ParallelPlan
    counts: ModelCounts
    estimate: MemoryEstimate


@dataclass(frozen=True)
class Change:
    """A change to a config that lowers its memory, and how a user asks for it."""

    description: str
    flags: str
    update: dict[str, Any]


def plan_memory(config: TrainConfig, *, cuda: bool | None = None) -> MemoryPlan:
    """The plan for ``config`` on its world and the memory it needs per device."""
    from modelloop.models.loading import read_config, resolve_family, resolve_model_source
    from modelloop.stages.train import check_tuner, plan_training

    tuner, options = check_tuner(config)
    model_config = read_config(resolve_model_source(config.model).base, trust_remote_code=config.trust_remote_code)
    family = resolve_family(model_config.model_type)
    _, plan = plan_training(config, model_config, family, cuda=cuda)
    counts = count_parameters(model_config, tuner, options, family, trust_remote_code=config.trust_remote_code)
    needed = estimate(
        plan,
        counts,
        model_config,
        dtype=config.dtype,
        batch_size=config.batch_size,
        max_length=config.max_length,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    return MemoryPlan(config, plan, counts, needed)


def changes(planned: MemoryPlan, cuda: bool) -> Iterator[Change]:
    """Changes that lower memory, cheapest in throughput first: sharding costs
    communication, recomputation a third more compute, a smaller micro-batch some
    utilisation, offload host transfers; QLoRA changes what is trained."""
    config, plan = planned.config, planned.plan
    if plan.world.size > 1 and plan.shard < 3:
        yield Change("shard weights, gradients and optimizer states over the ranks", "--strategy fsdp", {"strategy": "fsdp", "strategy_options": {}})
    if not config.gradient_checkpointing and not plan.activation_checkpointing:
        yield Change("recompute activations in the backward pass", "--gradient-checkpointing", {"gradient_checkpointing": True})
    batch, accumulation = config.batch_size, config.grad_accum
    while batch > 1:
        batch, accumulation = batch // 2, accumulation * 2
        yield Change("a smaller micro-batch, the same global batch", f"--batch-size {batch} --grad-accum {accumulation}", {"batch_size": batch, "grad_accum": accumulation})
    if cuda and plan.world.size > 1 and "optimizer" not in plan.offload:
        yield Change("keep weights and optimizer states in host memory", "--strategy fsdp --set strategy_options.offload=true", {"strategy": "fsdp", "strategy_options": {"offload": True}})
    if config.tuner in ("full", "lora", "dora"):
        yield Change("train LoRA adapters on a 4-bit base (QLoRA)", "--tuner qlora", {"tuner": "qlora", "tuner_options": {}})


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
        "",
        f"memory per {'GPU' if cuda else 'process'} (estimate, batch {planned.config.batch_size} x {planned.config.max_length} tokens)",
    ]
    for name, value in (("weights", needed.weights), ("gradients", needed.gradients), ("optimizer", needed.optimizer), ("activations", needed.activations), ("buffers", needed.buffers)):
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
