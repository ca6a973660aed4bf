"""The ``deepspeed`` parallel strategy: ZeRO stage 1, 2 or 3 through transformers' Trainer.

modelloop writes the DeepSpeed config — the ZeRO stage, offload, and ``"auto"`` wherever
the Trainer knows the value (batch sizes, accumulation, clipping, precision), so the two
never disagree — and a user's JSON (``strategy_options.config``) is merged over it.
ZeRO-3 gathers the 16-bit weights when the model is saved, so the run's ``model/`` is an
ordinary safetensors folder rather than DeepSpeed's partitioned checkpoint.

On CPUs DeepSpeed needs ``DS_ACCELERATOR=cpu``; it compiles its ops on first use (a minute
for CPU Adam, where a user's config asks for it), into ``TORCH_EXTENSIONS_DIR``, which the
plan points at modelloop's cache so that it happens once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelloop.plugin import (
    ParallelPlan,
    ParallelStrategy,
    PlanRequest,
    cache_home,
    complete,
    hookimpl,
    merge,
    parallelism_environment,
    sequence_parallel_mesh,
)

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against

DEFAULTS = {"stage": 2, "offload_optimizer": False, "offload_parameters": False, "config": None}


def deepspeed_config(options: Mapping[str, Any], *, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config for these options, with the user's JSON merged over it."""
    stage = options["stage"]
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 3:
        zero.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
    if options["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if options["offload_parameters"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    config: dict[str, Any] = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
    }
    if options["offload_optimizer"]:
        # the optimizer is the tuner's (its parameter groups and rates), run on the host
        # copies; DeepSpeed would otherwise insist on its own CPU Adam
        config["zero_force_ds_cpu_optimizer"] = False
    if options["config"]:
        config = merge(config, read_user_config(Path(options["config"])))
    zero = config["zero_optimization"]
    if zero.get("stage") not in (1, 2, 3):
        raise ValueError(f"stage must be 1, 2 or 3, not {zero.get('stage')!r}")
    if zero["stage"] == 3:  # also when the user's JSON chose stage 3: model/ must be an ordinary folder
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if offloaded(zero, "offload_param") and zero["stage"] != 3:
        raise ValueError("offload_parameters needs stage 3 (only ZeRO-3 partitions the weights)")
    return config


def offloaded(zero: Mapping[str, Any], key: str) -> bool:
    return zero.get(key, {}).get("device", "none") != "none"


def read_user_config(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"config {path}: no such file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"config {path}: not valid JSON ({error})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"config {path}: a DeepSpeed config is a JSON object")
    return loaded


def plan(request: PlanRequest) -> ParallelPlan:
    options = complete(request.options, DEFAULTS)
    mesh = sequence_parallel_mesh(request)
    config = deepspeed_config(options, cuda=request.cuda)  # checked after the user's JSON is merged in
    zero = config["zero_optimization"]
    stage = zero["stage"]
    offload = tuple(
        name
        for name, key in (("optimizer", "offload_optimizer"), ("parameters", "offload_param"))
        if offloaded(zero, key)
    )
    environment = {"TORCH_EXTENSIONS_DIR": str(cache_home() / "torch_extensions")}
    if request.sequence_parallel > 1:  # Ulysses: heads exchanged all-to-all, through accelerate's ParallelismConfig
        environment.update(
            parallelism_environment(sp_size=mesh["cp"], sp_backend="deepspeed", sp_attn_implementation="sdpa")
        )
    if not request.cuda:
        environment["DS_ACCELERATOR"] = "cpu"
    return ParallelPlan(
        strategy="deepspeed",
        world=request.world,
        mesh=mesh,
        shard=stage,
        offload=offload,
        master_weights=True,
        backend=request.backend,
        trainer_arguments={"deepspeed": config},
        environment=environment,
        notes=(f"ZeRO-{stage}" + (", weights gathered to 16-bit safetensors on save" if stage == 3 else ""),),
    )


def join_deepspeed(model: Any, plan: ParallelPlan) -> Any:
    """Set up DeepSpeed's own communication layer on the process group the stage joined
    (accelerate leaves it out when the group exists; Ulysses and ZeRO-3 need it)."""
    import deepspeed

    if plan.backend == "gloo":
        leave_out_shared_memory_all_reduce()
    deepspeed.init_distributed(dist_backend=plan.backend)
    return model


def leave_out_shared_memory_all_reduce() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory all-reduce: it builds
    that C++ op whenever it starts on CPUs (30-45 s on a machine's first run), but only
    DeepSpeed-Inference's tensor parallelism calls it (``inference_all_reduce``); training
    reduces through the process group. DeepSpeed keeps the compatible ops in one dict that
    it reads then, and says that edits to it persist."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@hookimpl
def register_parallel_strategies(register):
    register(
        ParallelStrategy(
            name="deepspeed",
            description="DeepSpeed ZeRO-1/2/3: optimizer states, gradients and weights sharded, optional CPU offload",
            plan=plan,
            apply=join_deepspeed,
            requires=("deepspeed",),
        )
    )
