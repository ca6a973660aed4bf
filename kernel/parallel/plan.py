"""The parallel plan: what a strategy decides for one model on one world.

A plan is data — the mesh, how much is sharded and offloaded, what is wrapped, and the
arguments the trainer, the model loader and the workers' environment need to carry it
out — so it can be printed by ``modelloop plan``, checked before any worker starts, and
stored in the run's manifest next to the config it came from.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from modelloop.errors import ModelloopError
from modelloop.parallel.world import World
from modelloop.specs import Tuner

#: mesh dimensions, in the order they are printed: data, tensor, pipeline, expert, context parallel.
MESH_DIMENSIONS = ("dp", "tp", "pp", "ep", "cp")

#: what each sharding level spreads over the data-parallel ranks (ZeRO's stages; FSDP's
#: full shard is 3, its shard-grad-op is 2).
SHARD_LEVELS = {
    0: "nothing (every rank holds everything)",
    1: "optimizer states",
    2: "optimizer states and gradients",
    3: "optimizer states, gradients and weights",
}


class PlanError(ModelloopError):
    """A plan that cannot work on this world: too few processes, a mesh that does not
    multiply out, a strategy that does not support the model."""


@dataclass(frozen=True)
class PlanRequest:
    """What a strategy plans for: the world, the model (its transformers config and
    family), the tuner (its ``Tuner`` spec: ask what it trains, not its name), the
    strategy's options and the shape of a training step."""

    world: World
    model_config: Any
    family: Any
    tuner: Tuner
    options: Mapping[str, Any]
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    cuda: bool
    sequence_parallel: int = 1

    @property
    def backend(self) -> str:
        """The collective backend: NCCL between GPUs, gloo on CPUs."""
        return "nccl" if self.cuda else "gloo"


@dataclass(frozen=True, kw_only=True)
class ParallelPlan:
    """A strategy's decision, complete enough to run and to print.

    :param mesh: dimension -> size, from ``MESH_DIMENSIONS``; their product is the world size.
    :param shard: what is spread over the ``dp`` ranks, a key of ``SHARD_LEVELS``.
    :param offload: what lives in host memory between uses: ``optimizer``, ``parameters``.
    :param activation_checkpointing: whether the strategy recomputes activations itself
        (the stage then leaves its own checkpointing off).
    :param master_weights: whether the optimizer keeps an fp32 copy of the trainable
        weights next to its states (DeepSpeed does).
    :param wrap: the module classes sharded or wrapped as one unit.
    :param trainer_arguments: fields of transformers' ``TrainingArguments``.
    :param load_options: extra ``from_pretrained`` arguments (``tp_plan``).
    :param environment: variables every worker starts with.
    """

    strategy: str
    world: World
    mesh: Mapping[str, int]
    shard: int = 0
    offload: tuple[str, ...] = ()
    mixed_precision: str | None = None
    activation_checkpointing: bool = False
    master_weights: bool = False
    wrap: tuple[str, ...] = ()
    backend: str = "gloo"
    trainer_arguments: Mapping[str, Any] = field(default_factory=dict)
    load_options: Mapping[str, Any] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.mesh) - set(MESH_DIMENSIONS)
        if unknown:
            raise PlanError(
                f"{self.strategy}: unknown mesh dimension {sorted(unknown)[0]!r} (known: {', '.join(MESH_DIMENSIONS)})"
            )
        product = 1
        for size in self.mesh.values():
            product *= size
        if product != self.world.size:
            raise PlanError(
                f"{self.strategy}: the mesh {self.mesh_text()} needs {product} processes, the world has {self.world.size}"
            )
        if self.shard not in SHARD_LEVELS:
            raise PlanError(f"{self.strategy}: shard level {self.shard} is not one of {sorted(SHARD_LEVELS)}")

    @property
    def dp(self) -> int:
        return self.mesh.get("dp", 1)

    def mesh_text(self) -> str:
        return " x ".join(f"{name}={self.mesh.get(name, 1)}" for name in MESH_DIMENSIONS if name in self.mesh) or "dp=1"

    def launcher_arguments(self) -> list[str]:
        """torchrun's arguments for this world (what a user would type to start it by hand)."""
        world = self.world
        return [
            f"--nproc-per-node={world.nproc}",
            f"--nnodes={world.nnodes}",
            f"--node-rank={world.node_rank}",
            f"--master-addr={world.master_addr}",
            f"--master-port={world.master_port}",
        ]

    def lines(self) -> list[str]:
        """The plan as a person reads it (``modelloop plan``, the start of a run)."""
        world = self.world
        rows = [
            ("strategy", self.strategy),
            (
                "world",
                f"{world.size} process{'es' if world.size > 1 else ''} ({world.nproc} per node x {world.nnodes} node{'s' if world.nnodes > 1 else ''}), {self.backend}",
            ),
            ("mesh", self.mesh_text()),
            (
                "sharded",
                SHARD_LEVELS[self.shard] + (f" over {self.dp * self.mesh.get('cp', 1)} ranks" if self.shard else ""),
            ),
            ("offload", ", ".join(self.offload) or "none"),
            ("precision", self.mixed_precision or "as loaded"),
            ("checkpointing", "by the strategy" if self.activation_checkpointing else "by the stage's setting"),
        ]
        if self.wrap:
            rows.append(("wrapped", ", ".join(self.wrap)))
        if world.size > 1:
            rows.append(("launch", "torchrun " + " ".join(self.launcher_arguments())))
        rows.extend(("note", note) for note in self.notes)
        width = max(len(label) for label, _ in rows)
        return [f"{label.ljust(width)}  {value}" for label, value in rows]

    def to_dict(self) -> dict[str, Any]:
        """The plan as the manifest stores it."""
        return {
            "strategy": self.strategy,
            "world": self.world.to_dict(),
            "mesh": dict(self.mesh),
            "shard": self.shard,
            "offload": list(self.offload),
            "mixed_precision": self.mixed_precision,
            "activation_checkpointing": self.activation_checkpointing,
            "master_weights": self.master_weights,
            "wrap": list(self.wrap),
            "backend": self.backend,
            "trainer_arguments": dict(self.trainer_arguments),
            "load_options": dict(self.load_options),
            "environment": dict(self.environment),
            "notes": list(self.notes),
        }


def sequence_parallel_mesh(request: PlanRequest) -> dict[str, int]:
    """``dp`` x ``cp`` for a request that splits each row over ``sequence_parallel`` ranks."""
    size, split = request.world.size, request.sequence_parallel
    if size % split:
        raise ValueError(f"--sequence-parallel {split} does not divide the {size} processes")
    if request.max_length % split:
        raise ValueError(f"max_length {request.max_length} does not split into {split} equal parts")
    return {"dp": size // split, "cp": split} if split > 1 else {"dp": size}


def parallelism_environment(**sizes: Any) -> dict[str, str]:
    """accelerate's ``ParallelismConfig`` as the variables it reads (``PARALLELISM_CONFIG_*``):
    the plan stays plain data, and the Trainer builds the config in every worker."""
    return {
        "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
        **{f"PARALLELISM_CONFIG_{key.upper()}": str(value) for key, value in sizes.items()},
    }


@contextmanager
def plan_environment(plan: ParallelPlan) -> Iterator[None]:
    """The plan's environment variables while a stage runs (its workers inherit them),
    the process's own afterwards. A variable the user set keeps the user's value."""
    added = {name: value for name, value in plan.environment.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def default_strategy(world: World) -> str:
    """``single`` for one process, ``ddp`` for more: what a user who names none expects."""
    return "single" if world.size == 1 else "ddp"


def make_plan(name: str | None, request: PlanRequest) -> tuple[Any, ParallelPlan]:
    """The named strategy (or the default for the world) and the plan it makes."""
    from modelloop.errors import require_libraries
    from modelloop.registry import PARALLEL_STRATEGIES, get_registry

    strategy = get_registry(PARALLEL_STRATEGIES).get(name or default_strategy(request.world))
    require_libraries(strategy, "strategy")
    if request.world.size < strategy.min_world_size:
        raise PlanError(
            f"the {strategy.name} strategy needs at least {strategy.min_world_size} processes (--nproc), the world has {request.world.size}"
        )
    if strategy.needs_cuda and not request.cuda:
        raise PlanError(f"the {strategy.name} strategy runs on CUDA GPUs only, and this machine has none")
    try:
        plan = strategy.plan(request)
    except (ValueError, TypeError) as error:
        raise PlanError(f"the {strategy.name} strategy: {error}") from None
    if not isinstance(plan, ParallelPlan):
        raise PlanError(f"the {strategy.name} strategy returned {type(plan).__name__}, not a ParallelPlan")
    if plan.mesh.get("cp", 1) != request.sequence_parallel:
        raise PlanError(
            f"the {strategy.name} strategy does not split sequences (--sequence-parallel): fsdp and deepspeed do"
        )
    return strategy, plan
