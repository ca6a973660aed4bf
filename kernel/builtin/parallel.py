"""The parallel strategies torch itself provides: ``single``, ``ddp``, ``fsdp`` (FSDP2's
``fully_shard``) and ``tp`` (DTensor tensor parallel with the model's TP plan).

Each plan is carried out by transformers' Trainer and accelerate (``trainer_arguments``)
and by ``from_pretrained`` (``load_options``): modelloop chooses and records, the
libraries made for it shard, gather and reduce.
"""

from __future__ import annotations

from typing import Any

from modelloop.hooks import hookimpl
from modelloop.options import complete
from modelloop.parallel.cpu import allow_fsdp_on_cpu, allow_tp_on_cpu
from modelloop.parallel.plan import ParallelPlan, PlanRequest, parallelism_environment, sequence_parallel_mesh
from modelloop.specs import ParallelStrategy


def plan_single(request: PlanRequest) -> ParallelPlan:
    complete(request.options, {})
    if request.world.size > 1:
        raise ValueError(f"single runs one process; for {request.world.size} choose ddp, fsdp, deepspeed or tp")
    return ParallelPlan(strategy="single", world=request.world, mesh={"dp": 1}, backend=request.backend)


def plan_ddp(request: PlanRequest) -> ParallelPlan:
    """A replica of the model on every rank; gradients averaged after each backward.

    For a vision-language model DDP looks for parameters a step did not use: a batch
    without pictures leaves the vision tower out of the backward pass."""
    options = complete(request.options, {"bucket_mb": 25})
    multimodal = request.family is not None and request.family.multimodal
    return ParallelPlan(
        strategy="ddp",
        world=request.world,
        mesh={"dp": request.world.size},
        backend=request.backend,
        trainer_arguments={
            "ddp_backend": request.backend,
            "ddp_find_unused_parameters": multimodal,
            "ddp_bucket_cap_mb": int(options["bucket_mb"]),
        },
    )


def plan_fsdp(request: PlanRequest) -> ParallelPlan:
    """FSDP2: each decoder layer's weights, gradients and optimizer states sharded over
    the ranks and gathered for its forward and backward."""
    options = complete(
        request.options,
        {"offload": False, "activation_checkpointing": False, "mixed_precision": None, "reshard_after_forward": True},
    )
    if options["mixed_precision"] not in (None, "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be bf16, fp16 or null, not {options['mixed_precision']!r}")
    if options["offload"] and not request.cuda:
        raise ValueError("offload moves weights and optimizer states to host memory; on CPUs they are there already")
    if options["activation_checkpointing"] and request.tuner.adapter:
        # FSDP's checkpoint wrapper renames modules, and an adapter saved by name is then empty
        raise ValueError(
            "FSDP's own activation checkpointing renames the modules an adapter is saved by; use --gradient-checkpointing for adapters"
        )
    mesh = sequence_parallel_mesh(request)
    environment = {}
    if request.sequence_parallel > 1:
        if not request.cuda:
            raise ValueError(
                "context parallelism (torch's ring attention) runs on CUDA GPUs only; on CPUs use deepspeed's Ulysses"
            )
        environment = parallelism_environment(dp_shard_size=mesh["dp"], cp_size=mesh["cp"], cp_backend="torch")
    layers = decoder_layers(request.model_config)
    arguments: dict[str, Any] = {
        "fsdp": "full_shard auto_wrap" + (" offload" if options["offload"] else ""),
        "fsdp_config": {
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": list(layers),
            "reshard_after_forward": bool(options["reshard_after_forward"]),
            "state_dict_type": "FULL_STATE_DICT",  # saved as one ordinary folder
            "activation_checkpointing": bool(options["activation_checkpointing"]),
            "cpu_ram_efficient_loading": False,
        },
    }
    if options["mixed_precision"]:
        arguments[options["mixed_precision"]] = True
    return ParallelPlan(
        strategy="fsdp",
        world=request.world,
        mesh=mesh,
        shard=3,
        offload=("optimizer", "parameters") if options["offload"] else (),
        mixed_precision=options["mixed_precision"],
        activation_checkpointing=bool(options["activation_checkpointing"]),
        wrap=layers,
        backend=request.backend,
        trainer_arguments=arguments,
        environment=environment,
    )


def plan_tp(request: PlanRequest) -> ParallelPlan:
    """Tensor parallel: every linear layer of attention and MLP split over ``size`` ranks
    (default: all) along the family's TP plan; with fewer than all, FSDP2 shards the rest
    of the world (a 2-D ``dp`` x ``tp`` mesh). transformers splits and shards the model as
    it loads it."""
    options = complete(request.options, {"size": request.world.size})
    if not request.tuner.trains_all_weights:
        raise ValueError(
            f"tp splits every layer and trains all its weights; tuner {request.tuner.name!r} trains only some (adapters on split layers are not supported)"
        )
    size, world = options["size"], request.world.size
    if not isinstance(size, int) or size < 2 or world % size:
        raise ValueError(f"size must be at least 2 and divide the {world} processes, got {size!r}")
    tp_plan = (
        request.family.tp_plan
        if request.family is not None and request.family.tp_plan
        else getattr(request.model_config, "base_model_tp_plan", None)
    )
    if not tp_plan:
        raise ValueError(
            f"model type {request.model_config.model_type!r} has no tensor-parallel plan (its family sets none, nor does its transformers config)"
        )
    heads = getattr(request.model_config, "num_key_value_heads", None) or request.model_config.num_attention_heads
    if heads % size:
        raise ValueError(f"{heads} key/value heads cannot be split over {size} ranks")
    dp = world // size
    distributed = {
        "tp_plan": dict(tp_plan) if request.family is not None and request.family.tp_plan else "auto",
        "tp_size": size,
        "fsdp_size": dp,
    }
    return ParallelPlan(
        strategy="tp",
        world=request.world,
        mesh={"dp": dp, "tp": size} if dp > 1 else {"tp": size},
        shard=3 if dp > 1 else 0,
        backend=request.backend,
        wrap=tuple(sorted(tp_plan)),
        load_options={"distributed_config": distributed},
        notes=("the ranks of a tp group read the same batch; weights are split, not replicated",),
    )


def open_fsdp_on_cpu(model: Any, plan: ParallelPlan) -> Any:
    if plan.backend == "gloo":
        allow_fsdp_on_cpu()
    return model


def open_tp_on_cpu(model: Any, plan: ParallelPlan) -> Any:
    if plan.backend == "gloo":
        allow_tp_on_cpu()
    return model


def decoder_layers(model_config: Any) -> tuple[str, ...]:
    """The model's repeated block classes (transformers' ``_no_split_modules``): the unit
    FSDP shards and gathers at a time."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    layers = tuple(getattr(model_class, "_no_split_modules", None) or ())
    if not layers:
        raise ValueError(f"model type {model_config.model_type!r} names no decoder layer class to shard by")
    return layers


STRATEGIES = (
    ParallelStrategy(name="single", description="one process, no parallelism", plan=plan_single),
    ParallelStrategy(
        name="ddp", description="data parallel: a replica per rank, gradients averaged (torch DDP)", plan=plan_ddp
    ),
    ParallelStrategy(
        name="fsdp",
        description="FSDP2 fully_shard: weights, gradients and optimizer states sharded per layer",
        plan=plan_fsdp,
        apply=open_fsdp_on_cpu,
    ),
    ParallelStrategy(
        name="tp",
        description="tensor parallel (DTensor) along the model's TP plan",
        plan=plan_tp,
        apply=open_tp_on_cpu,
        min_world_size=2,
    ),
)


@hookimpl
def register_parallel_strategies(register):
    for strategy in STRATEGIES:
        register(strategy)
