"""The ``megatron`` parallel strategy: megatron-core's tensor, pipeline, expert and
context parallelism (and its sequence parallelism), for ``sft`` and ``pt`` on GPUs.

The run starts from an ordinary transformers folder and ends as one: each rank converts
and loads only its shard of the checkpoint (``modelloop_megatron_checkpoint``), trains
with megatron-core's pipeline schedules, distributed data parallel and optimizer, and
rank 0 joins the shards back into ``model/`` (safetensors that transformers loads).

The layout on the mesh: ``tp`` ranks split every layer, ``pp`` stages hold a slice of
the layers each, ``cp`` ranks split every row (``--sequence-parallel``; Transformer
Engine's attention), and the remaining ranks are data parallel. ``ep`` is carved out of
the data-parallel ranks: an MoE layer's experts are spread over ``ep`` ranks while
everything else is replicated over ``dp`` x ``ep``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from modelloop.plugin import ParallelPlan, ParallelStrategy, PlanRequest, complete, hookimpl
from modelloop_megatron_checkpoint import (
    SUPPORTED_MODEL_TYPES,
    Layout,
    Shard,
    check_divisible,
    join_shards,
    megatron_to_hf,
)

PLUGIN_API = ">=1.1,<2"  # the versions of modelloop.plugin this plugin is written against

#: ``sequence_parallel`` None: on wherever it can be (tp > 1 with Transformer Engine).
DEFAULTS = {
    "tp": 1,
    "pp": 1,
    "ep": 1,
    "sequence_parallel": None,
    "distributed_optimizer": True,
    "moe_dispatcher": "alltoall",
}

#: transformers' scheduler names and megatron-core's.
SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}


def plan_megatron(request: PlanRequest) -> ParallelPlan:
    options = complete(request.options, DEFAULTS)
    tuner = request.tuner
    if not tuner.trains_all_weights or tuner.optimizer is not None or tuner.parameter_groups is not None:
        raise ValueError(
            f"megatron trains every weight with its own optimizer; tuner {tuner.name!r} "
            f"{'trains only some weights' if not tuner.trains_all_weights else 'brings its own optimizer'}: use fsdp or deepspeed"
        )
    if request.model_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {request.model_config.model_type!r} has no megatron-core conversion (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if options["moe_dispatcher"] not in ("alltoall", "allgather"):
        raise ValueError(f"moe_dispatcher must be alltoall or allgather, not {options['moe_dispatcher']!r}")
    window = _sliding_window(request.model_config)
    if window and request.max_length > window:
        raise ValueError(
            f"the model attends within a sliding window of {window} tokens, which megatron-core's attention does not; keep max_length at most {window}"
        )
    tp, pp, ep = (_size(options, name) for name in ("tp", "pp", "ep"))
    cp = request.sequence_parallel
    layout = Layout.from_hf(request.model_config)
    if ep > 1 and not layout.num_experts:
        raise ValueError(f"ep={ep}: the model has no experts to spread")
    check_divisible(layout, tp=tp, pp=pp, ep=ep)
    world = request.world.size
    if world % (tp * pp * cp * ep):
        raise ValueError(f"tp={tp} x pp={pp} x cp={cp} x ep={ep} does not divide the {world} processes")
    if cp > 1 and request.max_length % (2 * cp):
        raise ValueError(
            f"max_length {request.max_length} does not split into {2 * cp} equal chunks (context parallelism balances 2 per rank)"
        )
    if cp > 1 and not _transformer_engine():
        raise ValueError(
            "context parallelism (--sequence-parallel) needs Transformer Engine's attention: pip install transformer_engine"
        )
    sequence_parallel = (
        tp > 1 and _transformer_engine() if options["sequence_parallel"] is None else bool(options["sequence_parallel"])
    )
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel splits along the sequence within a tensor-parallel group: it needs tp > 1")
    if sequence_parallel and not _transformer_engine():
        raise ValueError(
            "sequence_parallel needs Transformer Engine's norms (megatron-core's own refuse it): pip install transformer_engine"
        )
    dp = world // (tp * pp * cp * ep)
    mesh = {"dp": dp, "tp": tp, "pp": pp, "ep": ep, "cp": cp}
    notes = [f"megatron-core GPTModel, {'Transformer Engine' if _transformer_engine() else 'local'} layer spec"]
    if sequence_parallel:
        notes.append("sequence parallel: norms and dropout split along the sequence over the tp ranks")
    if ep > 1:
        notes.append(f"experts spread over ep={ep} ranks; other weights replicated over dp x ep = {dp * ep} ranks")
    if pp > 1:
        notes.append(
            f"{layout.num_layers // pp} layers per pipeline stage; 1F1B schedule over grad_accum micro-batches"
        )
    return ParallelPlan(
        strategy="megatron",
        world=request.world,
        mesh={name: size for name, size in mesh.items() if size > 1 or name == "dp"},
        shard=1 if options["distributed_optimizer"] and dp * ep * cp > 1 else 0,
        master_weights=True,
        activation_checkpointing=request.gradient_checkpointing,
        backend=request.backend,
        trainer_arguments={"megatron": {**options, "sequence_parallel": sequence_parallel}},
        notes=tuple(notes),
    )


def _sliding_window(config: Any) -> int | None:
    """The window a model's attention is limited to, if any (Mistral; Qwen2 when enabled)."""
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return getattr(config, "sliding_window", None)


def _size(options: dict[str, Any], name: str) -> int:
    size = options[name]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a whole number of at least 1, not {size!r}")
    return size


def _transformer_engine() -> bool:
    from modelloop_megatron_model import transformer_engine_available

    return transformer_engine_available()


def refuse_unsupported(config: Any) -> None:
    """What this loop does not do yet, refused before any weight is read."""
    unsupported = {
        "packing": "packed rows need Transformer Engine's THD attention; pass --no-packing",
        "save_steps": "checkpoints mid-run are not written; leave save_steps unset",
        "resume": "there are no checkpoints to resume from",
        "eval_data": "evaluation during training is not run; evaluate model/ afterwards",
        "eval_split": "evaluation during training is not run; evaluate model/ afterwards",
    }
    for field, reason in unsupported.items():
        if getattr(config, field):
            raise ValueError(f"the megatron strategy does not support {field}: {reason}")


def train_megatron(job: Any) -> dict[str, float]:
    """Train ``job`` (``modelloop.training.TrainingJob``) with megatron-core; rank 0
    writes the result to ``job.run_dir / "model"`` as a transformers folder."""
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from modelloop_megatron_model import (
        SafetensorsFolder,
        build_stage,
        load_stage,
        transformer_config,
        transformer_engine_available,
    )

    config, plan, model_config = job.config, job.plan, job.model_config
    refuse_unsupported(config)
    if config.scheduler not in SCHEDULES:
        raise ValueError(f"scheduler {config.scheduler!r}: megatron-core runs {', '.join(SCHEDULES)}")
    options = plan.trainer_arguments["megatron"]
    mesh = plan.mesh
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    _join_world(config.hang_timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=mesh.get("tp", 1),
        pipeline_model_parallel_size=mesh.get("pp", 1),
        context_parallel_size=mesh.get("cp", 1),
        expert_model_parallel_size=mesh.get("ep", 1),
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=max(1, math.ceil(config.hang_timeout / 60)),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
    shard = Shard(
        tp=mesh.get("tp", 1),
        pp=mesh.get("pp", 1),
        ep=mesh.get("ep", 1),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
    )
    layout = Layout.from_hf(model_config)
    engine = transformer_engine_available()
    dtype = _dtype(config.dtype, model_config)
    transformer = transformer_config(
        model_config,
        mesh=mesh,
        sequence_parallel=options["sequence_parallel"],
        dtype=dtype,
        recompute=config.gradient_checkpointing,
        moe_dispatcher=options["moe_dispatcher"],
    )
    transformer.calculate_per_token_loss = (
        True  # the loss is the mean over the global batch's label tokens, as the Trainer's
    )
    stage = build_stage(model_config, transformer, shard, transformer_engine=engine)
    load_stage(stage, SafetensorsFolder(job.model_path), layout, shard, transformer_engine=engine)
    stage.cuda()
    model = DistributedDataParallel(
        config=transformer,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=options["distributed_optimizer"]
        ),
        module=stage,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=config.lr,
            min_lr=0.0,
            weight_decay=config.weight_decay,
            adam_beta1=0.9,
            adam_beta2=config.adam_beta2,
            clip_grad=config.max_grad_norm,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=options["distributed_optimizer"],
        ),
        [model],
    )
    transformer.finalize_model_grads_func = finalize_model_grads
    if dtype == torch.float16:
        transformer.grad_scale_func = optimizer.scale_loss

    data_ranks = parallel_state.get_data_parallel_world_size()
    batches = DataParallelBatches(
        job,
        data_ranks=data_ranks,
        data_rank=parallel_state.get_data_parallel_rank(),
        length=_row_length(config.max_length, mesh, options),
    )
    steps = config.max_steps or math.ceil(config.epochs * batches.per_epoch / config.grad_accum)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=config.lr,
        min_lr=0.0,
        lr_warmup_steps=0
        if config.scheduler == "constant"
        else int(config.warmup_ratio * steps),  # transformers' constant has none
        lr_decay_steps=steps,
        lr_decay_style=SCHEDULES[config.scheduler],
        start_wd=config.weight_decay,
        end_wd=config.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
    forward_backward = get_forward_backward_func()
    state = SimpleNamespace(global_step=0, max_steps=steps, is_world_process_zero=torch.distributed.get_rank() == 0)
    job.memory.restart()
    job.report.on_train_begin(None, state, None)
    losses = []
    for step in range(1, steps + 1):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reported = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=batches,
            model=[model],
            num_microbatches=config.grad_accum,
            seq_length=batches.length,
            micro_batch_size=config.batch_size,
            forward_only=False,
        )
        stepped, grad_norm, _ = optimizer.step()
        if stepped:  # fp16 skips the step when gradients overflow; the schedule waits too
            scheduler.step(increment=1)
        loss = _global_loss(reported)
        losses.append(loss)
        state.global_step = step
        job.report.on_step_end(None, state, None)
        if step % config.logging_steps == 0 or step == steps:
            logs = {
                "loss": loss,
                "learning_rate": scheduler.get_lr(optimizer.param_groups[0]),
                "grad_norm": float(grad_norm or 0.0),
                "epoch": batches.epoch_progress,
            }
            job.report.on_log(None, state, None, logs=logs)
    job.report.on_train_end(None, state, None)
    metrics = {"train_loss": sum(losses) / len(losses), "train_steps": float(steps), **job.memory.measured()}
    save_model(model.module, layout, shard, job, engine=engine)
    return metrics


def _join_world(timeout: float) -> None:
    """A one-process run has no torchrun world: megatron-core needs one all the same."""
    from modelloop.plugin import free_port, join_process_group

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    join_process_group("nccl", timeout)


def _dtype(name: str, model_config: Any) -> Any:
    import torch

    if name == "auto":
        saved = getattr(model_config, "dtype", None) or torch.float32
        return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved).removeprefix("torch."))
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _row_length(max_length: int, mesh: Any, options: Any) -> int:
    """Every row padded to one length: pipeline stages exchange fixed shapes, context
    parallelism cuts a row into 2 x cp chunks and sequence parallelism into tp."""
    cp, tp = mesh.get("cp", 1), mesh.get("tp", 1)
    multiple = 2 * cp if cp > 1 else 1
    if options["sequence_parallel"]:  # each context-parallel rank's part of a row splits over tp
        multiple = math.lcm(multiple, cp * tp)
    return -(-max_length // multiple) * multiple


class DataParallelBatches:
    """Micro-batches for this data-parallel rank, endlessly over epochs: the registry
    sampler's seeded order, every ``data_ranks``-th batch, each row right-padded to
    ``length`` with megatron's next-token labels and loss mask."""

    def __init__(self, job: Any, *, data_ranks: int, data_rank: int, length: int) -> None:
        self.job = job
        self.data_ranks, self.data_rank, self.length = data_ranks, data_rank, length
        self.batch_size = job.config.batch_size
        self.per_epoch = len(job.data) // (self.batch_size * data_ranks)
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(job.data)} rows make no batch of {self.batch_size} on each of {data_ranks} data-parallel ranks"
            )
        self.epoch, self.taken = 0, 0
        self._batches = self._epoch()

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.taken / self.per_epoch

    def _epoch(self):
        self.job.sampler.set_epoch(self.epoch)
        order = list(self.job.sampler)
        width = self.batch_size * self.data_ranks
        for start in range(0, self.per_epoch * width, width):
            mine = order[start + self.data_rank * self.batch_size : start + (self.data_rank + 1) * self.batch_size]
            yield self._batch([self.job.data[index] for index in mine])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        try:
            batch = next(self._batches)
        except StopIteration:
            self.epoch, self.taken = self.epoch + 1, 0
            self._batches = self._epoch()
            batch = next(self._batches)
        self.taken += 1
        return batch

    def _batch(self, items: list[Any]) -> dict[str, Any]:
        import torch

        from modelloop.plugin import IGNORE

        tokens = torch.full((len(items), self.length), self.job.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), self.length), IGNORE, dtype=torch.long)
        for row, (ids, example_labels) in enumerate(items):
            tokens[row, : len(ids)] = torch.as_tensor(ids)
            labels[row, : len(ids) - 1] = torch.as_tensor(example_labels[1:])  # megatron's labels are the next tokens
        self.job.collator.tokens += sum(len(ids) for ids, _ in items)
        lengths = torch.tensor([len(ids) for ids, _ in items])
        padding = torch.arange(self.length)[None] >= lengths[:, None]  # MoE routers leave these out of their balance
        mask = labels != IGNORE
        return {
            "tokens": tokens,
            "labels": labels.clamp(min=0),
            "loss_mask": mask,
            "padding_mask": padding,
            "position_ids": torch.arange(self.length).expand(len(items), -1),
        }


def _forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
    import torch
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = {key: value.cuda(non_blocking=True) for key, value in next(data_iterator).items()}
    batch = get_batch_on_this_cp_rank(batch)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        attention_mask=None,
        labels=batch["labels"],
        padding_mask=batch["padding_mask"],
    )
    mask = batch["loss_mask"].float()

    def loss(per_token: Any) -> tuple[Any, Any, dict[str, Any]]:
        total, count = (per_token.float() * mask).sum(), mask.sum()
        return total, count.int(), {"lm loss": torch.stack([total.detach(), count])}

    return output, loss


def _global_loss(reported: list[dict[str, Any]]) -> float:
    """The step's mean loss over every label token of the global batch, known on rank 0
    even when the last pipeline stage is elsewhere."""
    import torch
    from megatron.core import parallel_state

    summed = torch.zeros(2, device="cuda")
    counts_once = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    if counts_once:  # the ranks of one tensor-parallel group report the same numbers
        for entry in reported:
            summed += entry["lm loss"]
    torch.distributed.all_reduce(summed)
    return (summed[0] / summed[1].clamp(min=1)).item()


def save_model(stage: Any, layout: Layout, shard: Shard, job: Any, *, engine: bool) -> None:
    """Gather one copy of every shard on rank 0, join and convert them, and write
    ``model/`` as a transformers folder. The whole model passes through rank 0's host
    memory once."""
    import torch
    from megatron.core import parallel_state

    from modelloop_megatron_model import stage_state_dict, write_hf_folder

    # the first data-parallel replica holds every tensor-parallel shard of the dense
    # weights; the experts' ranks come from megatron's own expert mesh, whose first
    # expert-data-parallel replica holds every expert
    dense = parallel_state.get_context_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    experts = shard.ep > 1 and parallel_state.get_expert_data_parallel_rank() == 0
    mine = (
        (
            shard,
            {
                key: value.detach().cpu()
                for key, value in stage_state_dict(stage, layout, transformer_engine=engine).items()
            },
        )
        if dense or experts
        else None
    )
    host = torch.distributed.new_group(backend="gloo")  # through host memory: the GPUs still hold the optimizer
    gathered: list[Any] = [None] * torch.distributed.get_world_size() if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0, group=host)
    if torch.distributed.get_rank() != 0:
        return
    joined = join_shards(dict(part for part in gathered if part is not None), layout)
    write_hf_folder(megatron_to_hf(joined, layout), job.model_config, Path(job.run_dir) / "model")


@hookimpl
def register_parallel_strategies(register):
    register(
        ParallelStrategy(
            name="megatron",
            description="megatron-core: tensor, pipeline, expert and context parallel (GPUs)",
            plan=plan_megatron,
            train=train_megatron,
            requires=("megatron.core",),
            needs_cuda=True,
        )
    )
