"""``sft`` and ``pt``: supervised fine-tuning and (continued) pre-training.

Everything that can be checked without a model is checked first, in this order, so a
mistake fails in the first second: the config's values, the tuner and its options and
libraries, the sampler and format names, the model's config (max_length against its
context), then every data record. Only then are the weights loaded. The stage writes a
run folder: ``model/`` (adapter or full weights, safetensors, with the tokenizer and the
chat template it was trained with), ``config.json`` (resolved), ``metrics.jsonl``,
``loss.png``, ``checkpoints/`` and ``manifest.json``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelloop.artifacts import (
    environment,
    hashed_files,
    is_run,
    new_run_dir,
    read_manifest,
    run_id,
    runs_root,
    sha256_path,
    update_manifest,
    write_json_atomic,
)
from modelloop.config import ConfigError, TrainConfig, build_config
from modelloop.data.sources import DataSource
from modelloop.errors import ModelloopError, require_libraries
from modelloop.lifecycle import StageContext, stage_lifecycle
from modelloop.models.loading import read_config, resolve_family, resolve_model_source
from modelloop.models.precision import Precision
from modelloop.parallel.launch import launch, launched_worker
from modelloop.parallel.memory import PeakMemory
from modelloop.parallel.plan import ParallelPlan, PlanError, PlanRequest, make_plan, plan_environment
from modelloop.parallel.world import World, in_worker, is_main_process, join_process_group, rank, torchrun_world
from modelloop.plugins import get_plugin_manager
from modelloop.registry import ACCELERATORS, DATASET_FORMATS, SAMPLERS, TEMPLATES, TUNERS, get_registry
from modelloop.specs import Accelerator, ParallelStrategy, Tuner

Stage = Literal["sft", "pt"]
KIND = {"sft": "conversation", "pt": "text"}


def check_tuner(config: TrainConfig) -> tuple[Tuner, dict[str, Any]]:
    """The tuner, its libraries present and its options valid — before anything loads."""
    tuner = get_registry(TUNERS).get(config.tuner)
    require_libraries(tuner, "tuner")
    try:
        options = dict(tuner.check(config.tuner_options)) if tuner.check else dict(config.tuner_options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"tuner_options for {tuner.name}: {error}") from None
    return tuner, options


def check_names(config: TrainConfig) -> None:
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(f"--report-to {config.report_to} needs the {config.report_to} package: pip install {config.report_to}")
    check_sampler(config)
    if config.format:
        get_registry(DATASET_FORMATS).get(config.format)
    if config.template:
        get_registry(TEMPLATES).get(config.template)


def check_data_files(config: TrainConfig) -> None:
    """Every data file is there before a run folder is made for it (a typo in --data must
    not leave a failed run behind)."""
    for text in [*config.data, *config.eval_data]:
        path = DataSource.parse(text).path
        if not path.exists():
            raise ConfigError(f"{path}: no such data file or folder")


def check_sampler(config: TrainConfig) -> None:
    """The sampler exists, takes the options given, and accepts their values (on a
    two-example set of each modality, before any data is read)."""
    sampler = get_registry(SAMPLERS).get(config.sampler)
    unknown = sorted(set(config.sampler_options) - set(sampler.option_names))
    if unknown:
        raise ConfigError(f"sampler_options.{unknown[0]}: the {sampler.name} sampler takes {', '.join(sampler.option_names) or 'no options'}")
    probe = {"modalities": ["image", "text"]} if sampler.reads_modalities else {}
    try:
        list(sampler.order([1, 1], batch_size=2, seed=0, **config.sampler_options, **probe))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"sampler_options for {sampler.name}: {error}") from None


def check_accelerators(config: TrainConfig, model_type: str) -> list[Accelerator]:
    """Each accelerator installed, supported for this model, and on the hardware it needs."""
    found = []
    for name in config.accelerators:
        accelerator = get_registry(ACCELERATORS).get(name)
        require_libraries(accelerator, "accelerator")
        if accelerator.needs_cuda:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"the {accelerator.name} accelerator runs on CUDA GPUs only, and this machine has none")
        if model_type not in accelerator.model_types:
            raise ConfigError(
                f"the {accelerator.name} accelerator does not support model type {model_type!r} "
                f"(it supports: {', '.join(accelerator.model_types)})"
            )
        found.append(accelerator)
    return found


def check_module_groups(config: TrainConfig, family: Any) -> None:
    """``--freeze`` and the per-group rates name groups the family has."""
    from modelloop.models.groups import check_groups

    try:
        check_groups([*config.freeze, *config.group_lr], family.module_groups, family.name)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def check_context(model_config: Any, config: TrainConfig) -> None:
    context = getattr(model_config, "max_position_embeddings", None)
    if context and config.max_length > context:
        raise ConfigError(f"max_length {config.max_length} is longer than the model's context ({context} tokens)")


def run_to_resume(stage: str, resume: bool | str | Path, output_dir: Path | None = None) -> tuple[Path, Path | None] | None:
    """The run folder to continue and, when one was named, the checkpoint to start from.

    ``resume`` is False (start afresh), True (``output_dir`` if it is a run, else the
    latest unfinished run of this stage), a run folder, or one of its checkpoints.
    """
    if resume is False:
        return None
    if resume is not True:
        path = Path(resume)
        if path.parent.name == "checkpoints" and is_run(path.parent.parent):
            if not (path / "trainer_state.json").is_file():
                raise ConfigError(f"--resume {path}: not a complete checkpoint")
            return path.parent.parent, path
        if not is_run(path):
            raise ConfigError(f"--resume {path}: not a run folder or one of its checkpoints")
        return path, None
    if output_dir is not None:
        return (output_dir, None) if is_run(output_dir) else None
    unfinished = [
        run
        for run in sorted(runs_root().glob(f"*-{stage}*"))
        if is_run(run) and read_manifest(run).get("status") != "completed"
    ]
    if not unfinished:
        raise ConfigError(f"--resume: no unfinished {stage} run under {runs_root()}")
    return unfinished[-1], None


def train(stage: Stage, config: TrainConfig | Mapping[str, Any], *, owns_process: bool = False) -> dict[str, Any]:
    """Run a training stage; returns the run's final metrics and folder. ``owns_process``:
    nothing runs in this process after the stage (``settle_owned_process``)."""
    if not isinstance(config, TrainConfig):
        config = build_config(TrainConfig, config)
    config = settle_memory_settings(config)
    checked = check_training(config, packed_rows=config.packing)
    if owns_process:
        settle_owned_process(config, checked)
    return run_stage(stage, config, checked, lambda run_dir, context, continuing: _run(stage, config, checked, run_dir, context, resume=continuing))


@dataclass(frozen=True)
class Checked:
    """What the checks before loading found: the tuner and its options, the model's source,
    family and config, the accelerators, and the parallel strategy with its plan."""

    tuner: Tuner
    options: dict[str, Any]
    source: Any
    family: Any
    model_config: Any
    accelerators: list[Accelerator]
    strategy: ParallelStrategy
    plan: ParallelPlan
    precision: Precision
    attention: str


def check_training(config: TrainConfig, *, packed_rows: bool = False) -> Checked:
    """Every check that needs no weights: names, tuner, model config, context, accelerators,
    precision and attention (``packed_rows``: the batches are packed rows)."""
    from modelloop.models.loading import choose_attention

    tuner, options = check_tuner(config)
    check_names(config)
    check_data_files(config)
    source = resolve_model_source(config.model)
    model_config = read_config(source.base, trust_remote_code=config.trust_remote_code)
    check_context(model_config, config)
    family = resolve_family(model_config.model_type)
    check_module_groups(config, family)
    accelerators = check_accelerators(config, model_config.model_type)
    strategy, plan = plan_training(config, model_config, family)
    if strategy.train is not None and source.adapter:
        raise ConfigError(f"the {strategy.name} strategy starts from full weights, and {config.model} is an adapter run: merge it first (modelloop export)")
    if strategy.train is not None and (config.freeze or config.group_lr):
        raise ConfigError(f"the {strategy.name} strategy trains with its own optimizer: --freeze and per-group rates are not applied there")
    try:
        precision = Precision.for_this_machine(config.dtype)
        half = precision.compute in ("bf16", "fp16")
        attention = choose_attention(config.attn_impl, model_config, family, gpu=_cuda_capability(), packing=packed_rows, half=half)
    except ModelloopError as error:
        raise ConfigError(str(error)) from None
    return Checked(tuner, options, source, family, model_config, accelerators, strategy, plan, precision, attention)


def settle_memory_settings(config: TrainConfig) -> TrainConfig:
    """The memory settings the user left unset: on a GPU chosen from the memory plan
    (``modelloop.parallel.planner.choose_unset``, what ``modelloop plan`` reports),
    elsewhere gradient checkpointing off and the batch as configured."""
    if not _cuda_available() or in_worker():  # a worker runs the settings its launcher chose
        return config.model_copy(update={"gradient_checkpointing": False}) if config.gradient_checkpointing is None else config
    import torch

    from modelloop.parallel.planner import choose_unset

    settled, chosen = choose_unset(config, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if chosen and is_main_process():
        print(f"modelloop: memory plan: {', '.join(chosen)}")
    return settled


def settle_owned_process(config: TrainConfig, checked: Checked) -> None:
    """Before the heavy imports of a process that runs one stage (``modelloop.process``):
    leave out the libraries it does not use, and keep freed memory for the next step."""
    from modelloop.process import keep_freed_memory

    leave_out_unused_libraries(config, checked)
    keep_freed_memory()


def leave_out_unused_libraries(config: TrainConfig, checked: Checked) -> list[str]:
    """Keep the libraries that transformers, accelerate and peft import only because they
    are installed out of this process, unless the tuner, strategy or accelerators require
    them (``modelloop.process``). Weights stored quantized keep them all (their loader may
    need any), and so does a model's own code (``trust_remote_code``: it may import any).
    Called before any of those three is imported."""
    from modelloop.process import EAGERLY_IMPORTED, leave_out

    if config.trust_remote_code or getattr(checked.model_config, "quantization_config", None) is not None:
        return []
    needed = {module.split(".")[0] for spec in (checked.tuner, checked.strategy, *checked.accelerators) for module in spec.requires}
    return leave_out(name for name in EAGERLY_IMPORTED if name not in needed)


def plan_training(config: TrainConfig, model_config: Any, family: Any, *, cuda: bool | None = None) -> tuple[ParallelStrategy, ParallelPlan]:
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
        tuner=config.tuner,
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


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def run_stage(stage: str, config: TrainConfig, checked: Checked, body: Callable[[Path, Any, Any], dict[str, Any]]) -> dict[str, Any]:
    """Open (or reopen, to resume) the run folder, run ``body`` inside the stage's lifecycle
    hooks, and record a failure in the manifest.

    A plan for several processes is handed to the launcher, which starts the workers;
    each worker comes back here. Rank 0 of node 0 owns the run folder (manifest, config,
    hooks); every other process trains, in the folder the launcher named. The plan's
    environment holds for the stage only (a recipe's next stage starts clean).
    """
    plan = checked.plan
    world = plan.world
    launching = world.size > 1 and not in_worker()
    if world.size > 1 and config.output_dir is None and (in_worker() or world.node_rank > 0):
        raise ConfigError("every rank must write to one run folder: give --output-dir (on a filesystem every node shares)")
    with plan_environment(plan):
        if launching and world.node_rank > 0:  # another node's launcher: node 0 keeps the run folder
            return launch(stage, config, plan, config.output_dir)
        continuing = run_to_resume(stage, config.resume, config.output_dir)
        if in_worker() and rank() > 0:
            return body(config.output_dir, StageContext(stage, config.model_dump(mode="json"), config.output_dir, get_plugin_manager()), continuing)
        run_dir = continuing[0] if continuing else new_run_dir(stage, config.output_dir)
        resolved = config.model_dump(mode="json")
        manager = get_plugin_manager()
        recorded = {} if launched_worker() else {"config": resolved}  # the launcher recorded the config as the user gave it
        update_manifest(
            run_dir,
            id=run_id(run_dir),
            stage=stage,
            status="running",
            parent=checked.source.parent,
            base_model=checked.source.base,
            parallel=plan.to_dict(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S"),
            **recorded,
            **environment({name: info.version for name, info in manager.info.items()}),
        )
        if recorded:
            write_json_atomic(run_dir / "config.json", resolved)
        if launching:
            print("\n".join(f"modelloop: plan: {line}" for line in plan.lines()))
            resume: Any = (continuing[1] or run_dir) if continuing else False
            return launch(stage, config.model_copy(update={"output_dir": run_dir, "resume": resume}), plan, run_dir)
        with stage_lifecycle(stage, resolved, run_dir, manager) as context:
            try:
                result = body(run_dir, context, continuing)
            except BaseException as error:
                update_manifest(run_dir, status="failed", error=f"{type(error).__name__}: {error}")
                raise
            context.result.update(result)
        return context.result


def load_trainable(config: TrainConfig, checked: Checked, run_dir: Path, *, onednn: bool = False) -> Any:
    """The model loaded, accelerated and prepared by the tuner, ready to train; ``onednn``:
    its linear layers multiply with oneDNN (``multiplies_with_onednn``).

    An adapter run as the starting point is folded into its base first. When the new
    tuner trains an adapter too, that merged base is saved in the run (``base/``) and is
    the run's ``base_model``: the new adapter belongs on it, not on the original base.
    """
    import torch

    from modelloop.models.checkpointing import checkpoint_layers
    from modelloop.models.cpu_linear import multiply_with_onednn
    from modelloop.models.loading import load_model

    tuner, options, plan, precision = checked.tuner, checked.options, checked.plan, checked.precision
    extra = {**(tuner.load_options(options) if tuner.load_options else {}), **plan.load_options}
    dtype = precision.load_dtype(trains_base_weights=not tuner.adapter)
    loaded = load_model(config.model, dtype=dtype, attn_implementation=checked.attention, trust_remote_code=config.trust_remote_code, **extra)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        if tuner.adapter:
            if is_main_process():
                model.save_pretrained(merged_base(run_dir), safe_serialization=True)
                update_manifest(run_dir, base_model=str(merged_base(run_dir).resolve()))
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # rollouts read base/ on every rank
    for accelerator in checked.accelerators:
        model = accelerator.apply(model, checked.family)
    if onednn:
        multiply_with_onednn(model)
    if config.gradient_checkpointing and not plan.activation_checkpointing:
        checkpoint_layers(model)
    torch.manual_seed(config.seed)
    model = tuner.prepare(model, options, checked.family)
    if config.freeze:
        from modelloop.models.groups import freeze

        freeze(model, checked.family.module_groups, config.freeze)
    precision.place(model)
    model.config.use_cache = False
    if checked.strategy.apply is not None:
        model = checked.strategy.apply(model, plan)
    return model


def multiplies_with_onednn(config: TrainConfig, plan: ParallelPlan) -> bool:
    """Whether sft and pt multiply the linear layers with oneDNN (``modelloop.models.cpu_linear``):
    on a CPU, as asked (``auto``: where batches come in few shapes), and with whole weights
    and gradients on every rank (a strategy that splits them keeps torch's own layers). Not
    rlhf: TRL's collators pad each batch to its own length, and oneDNN keeps compiled code
    for every shape it meets."""
    import torch

    from modelloop.models.cpu_linear import AUTO_UNPACKED_LENGTH, onednn_available

    if config.cpu_matmul == "blas" or (config.cpu_matmul == "auto" and not config.packing and config.max_length > AUTO_UNPACKED_LENGTH):
        return False
    return not torch.cuda.is_available() and plan.shard == 0 and plan.mesh.get("tp", 1) == 1 and onednn_available()


def record_module_groups(model: Any, config: TrainConfig, checked: Checked, run_dir: Path) -> None:
    """Print what each module group trains, and at what rate, and keep it in the manifest."""
    from modelloop.models.groups import describe

    groups = checked.family.module_groups
    if not groups or not is_main_process():
        return
    summary = describe(model, groups, config.group_lr, config.lr)
    for name, numbers in summary.items():
        state = f"trained at lr {numbers['lr']:g}" if numbers["trainable"] else "frozen"
        print(f"modelloop: group {name}: {numbers['parameters']:,} parameters, {numbers['trainable']:,} trainable, {state}")
    update_manifest(run_dir, module_groups=summary)


def merged_base(run_dir: Path) -> Path:
    """Where a run keeps the merged base its adapter was trained on (see ``load_trainable``)."""
    return run_dir / "base"


def advise_schedule(config: TrainConfig, plan: ParallelPlan, *, rows: int, examples: int, rows_a_batch_row: int = 1) -> None:
    """Warn, before the first step, when the schedule cannot learn much from the data
    (``modelloop.schedule``). ``rows_a_batch_row``: batch rows one training row takes
    (GRPO's batch counts completions, ``num_generations`` to a prompt)."""
    from modelloop.log import warn_once
    from modelloop.schedule import schedule_advice

    rows_per_step = max(1, config.batch_size * config.grad_accum * plan.dp // rows_a_batch_row)
    advice = schedule_advice(rows=rows, examples=examples, rows_per_step=rows_per_step, max_steps=config.max_steps, epochs=config.epochs, packed=config.packing)
    if advice and is_main_process():
        warn_once(advice)


def trainer_arguments(config: TrainConfig, run_dir: Path, *, evaluating: bool, plan: ParallelPlan | None = None) -> dict[str, Any]:
    """The transformers ``TrainingArguments`` every stage shares (TRL's configs extend
    them), with the parallel plan's on top."""
    import torch

    shared = {
        "output_dir": str(run_dir / "checkpoints"),
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "num_train_epochs": config.epochs,
        "max_steps": config.max_steps or -1,
        "learning_rate": config.lr,
        "lr_scheduler_type": config.scheduler,
        "warmup_steps": config.warmup_ratio,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": config.logging_steps,
        "save_strategy": "steps" if config.save_steps else "no",
        "save_steps": config.save_steps or 500,
        "save_total_limit": config.save_total_limit,
        "eval_strategy": "steps" if evaluating and config.eval_steps else "no",
        "eval_steps": config.eval_steps,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": [] if config.report_to == "none" else [config.report_to],
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "ddp_timeout": config.hang_timeout,
        **Precision.for_this_machine(config.dtype).trainer_arguments,
    }
    return {**shared, **(plan.trainer_arguments if plan is not None else {})}


def record_compute(run_dir: Path, checked: Checked, loss: str) -> None:
    """Say, and keep in the manifest, what the run computes with: the precision, the
    attention kernel and how the loss is computed."""
    if not is_main_process():
        return
    print(f"modelloop: compute: {checked.precision.describe()}, attention {checked.attention}, loss {loss}")
    update_manifest(run_dir, compute={"precision": checked.precision.to_dict(), "attention": checked.attention, "loss": loss})


def output_layer_loss(model: Any, checked: Checked) -> tuple[Any, str]:
    """How sft and pt compute the loss, and in words: in the output layer, with an
    accelerator's fused kernel or the built-in chunked one (``modelloop.models.output_loss``),
    or, where that cannot be, the model's own loss from the logits at labelled positions."""
    from modelloop.models.output_loss import OutputLayerLoss, reason_plan_keeps_it, unsupported_reason

    reason = reason_plan_keeps_it(checked.plan) or unsupported_reason(model)
    if reason is not None:
        return None, f"from the model's logits at labelled positions ({reason})"
    fused = next((accelerator for accelerator in checked.accelerators if accelerator.linear_cross_entropy is not None), None)
    if fused is not None:
        return OutputLayerLoss(model, fused.linear_cross_entropy), f"in the output layer, {fused.name}'s fused linear cross-entropy"
    return OutputLayerLoss(model), "in the output layer, chunked linear cross-entropy"


def finish_run(
    run_dir: Path,
    stage: str,
    config: TrainConfig,
    checked: Checked,
    trainer: Any,
    tokenizer: Any,
    chat: Any,
    *,
    stats: Mapping[str, Any],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Save the weights (or adapter) with the tokenizer and chat template, draw the plots,
    and complete the manifest. Every rank calls it: when the plan split the weights
    (ZeRO-3, FSDP, tensor parallel) the trainer gathers them from all ranks into one
    ordinary folder; rank 0 writes."""
    from transformers.trainer import TRAINING_ARGS_NAME

    model_dir = run_dir / "model"
    plan = checked.plan
    gathered = plan.shard >= 3 or plan.mesh.get("tp", 1) > 1
    if is_main_process():
        shutil.rmtree(model_dir, ignore_errors=True)  # an earlier attempt's weights are not this run's
    if gathered:  # every rank takes part; rank 0 writes
        trainer.save_model(str(model_dir))
    if not is_main_process():
        return {"run_dir": str(run_dir), "metrics": metrics}
    if gathered:
        (model_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)  # the trainer's, not the model's (config.json holds ours)
    else:
        (checked.tuner.save or _save_pretrained)(trainer.accelerator.unwrap_model(trainer.model), model_dir)
    return complete_run(run_dir, stage, config, checked, tokenizer, chat, stats=stats, metrics=metrics, wrapped_as=type(trainer.model_wrapped).__name__)


def complete_run(
    run_dir: Path,
    stage: str,
    config: TrainConfig,
    checked: Checked,
    tokenizer: Any,
    chat: Any,
    *,
    stats: Mapping[str, Any],
    metrics: dict[str, Any],
    wrapped_as: str,
) -> dict[str, Any]:
    """Rank 0, once ``model/`` holds the weights: the tokenizer and chat template beside
    them, the loss plot, and the manifest completed (``wrapped_as``: what trained the model)."""
    from modelloop.training import plot_losses

    model_dir = run_dir / "model"
    plan = checked.plan
    if chat is not None:
        tokenizer.chat_template = chat.source
    tokenizer.save_pretrained(model_dir)
    if checked.family.vision is not None:  # the next stage reads images as this one did
        from modelloop.models.loading import load_image_processor

        load_image_processor(checked.source.tokenizer).save_pretrained(model_dir)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    sources = [DataSource.parse(f).path for f in [*config.data, *config.eval_data]]
    update_manifest(
        run_dir,
        status="completed",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        adapter=checked.tuner.adapter,
        data={
            "files": {str(path.resolve()): sha256_path(path) for path in sources},
            "train": [str(DataSource.parse(f).path.resolve()) for f in config.data],
            "stats": dict(stats),
        },
        metrics=metrics,
        files=hashed_files(model_dir),
        parallel={**plan.to_dict(), "wrapped_as": wrapped_as},
    )
    losses = f"train loss: mean {metrics['train_loss']:.4f}, last {metrics['train_loss_last']:.4f}" if "train_loss_last" in metrics else "no train loss logged"
    print(f"modelloop: {stage} finished: {run_dir} ({losses})")
    return {"run_dir": str(run_dir), "metrics": metrics}


def _run(stage: Stage, config: TrainConfig, checked: Checked, run_dir: Path, context: Any, *, resume: Any) -> dict[str, Any]:
    from transformers import PrinterCallback, TrainingArguments

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.cpu_linear import ROW_MULTIPLE
    from modelloop.models.loading import load_tokenizer
    from modelloop.training import Collator, MeasureFromFirstStep, ModelloopTrainer, ReportCallback, TrainingData, resume_point, step_of, whole_run_losses

    kind = KIND[stage]
    tokenizer = load_tokenizer(checked.source.tokenizer, trust_remote_code=config.trust_remote_code)
    chat = resolve_chat_format(tokenizer, checked.family, config.template, config.template_options) if kind == "conversation" else None
    images = image_tokens(checked, tokenizer, config)
    data_options = {"kind": kind, "format": config.format, "truncation": config.truncation, "skip_bad_records": config.skip_bad_records, "seed": config.seed, "images": images}
    data = prepare_data(config.data, tokenizer, chat, max_length=config.max_length, **data_options)
    evaluation = prepare_data(config.eval_data, tokenizer, chat, max_length=config.max_length, **data_options) if config.eval_data else None
    if is_main_process():
        print(f"modelloop: data: {data.stats.summary()}{' (cached)' if data.from_cache else ''}")

    memory = PeakMemory()
    if checked.strategy.train is not None:
        return _run_strategy_loop(stage, config, checked, run_dir, context, tokenizer, chat, data, memory)
    onednn = multiplies_with_onednn(config, checked.plan)
    model = load_trainable(config, checked, run_dir, onednn=onednn)
    record_module_groups(model, config, checked, run_dir)
    train_set = TrainingData.build(data, max_length=config.max_length, packing=config.packing)
    eval_set = TrainingData.build(evaluation, max_length=config.max_length, packing=config.packing) if evaluation else None
    if config.eval_split:
        eval_set, train_set = train_set.split(config.eval_split, config.seed)
    advise_schedule(config, checked.plan, rows=len(train_set), examples=data.stats.examples)
    rope_index = None
    if images is not None and config.packing and images.spec.rope_index is not None:
        rope_index = functools.partial(images.spec.rope_index, model)
    multiple = math.lcm(checked.plan.mesh.get("cp", 1), ROW_MULTIPLE if onednn else 1)
    collator = Collator(tokenizer.pad_token_id, config.packing, multiple=multiple, images=images, rope_index=rope_index)
    sampler = registry_sampler(config, train_set)
    arguments = TrainingArguments(**trainer_arguments(config, run_dir, evaluating=eval_set is not None, plan=checked.plan), prediction_loss_only=True)
    report = ReportCallback(run_dir / "metrics.jsonl", context.log, tokens=lambda: collator.tokens)
    output_loss, loss = output_layer_loss(model, checked)
    record_compute(run_dir, checked, loss)
    trainer = ModelloopTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        optimizer_factory=tuner_optimizer(config, checked),
        train_sampler=sampler,
        output_loss=output_loss,
        callbacks=[report, MeasureFromFirstStep(memory)],
    )
    trainer.remove_callback(PrinterCallback)
    checkpoint = resume_point(resume, run_dir)
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {key: value for key, value in outcome.metrics.items() if isinstance(value, (int, float))}
    metrics.update(whole_run_losses(run_dir / "metrics.jsonl", outcome.training_loss, step_of(checkpoint), trainer.state.global_step))
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        report.on_log(arguments, trainer.state, trainer.control, logs={key: v for key, v in metrics.items() if key.startswith("eval_")})
    metrics["train_tokens_per_second"] = collator.tokens * checked.plan.dp / train_seconds if train_seconds else 0.0  # each dp rank reads its own batches
    metrics.update(memory.measured())
    return finish_run(run_dir, stage, config, checked, trainer, tokenizer, chat, stats=data.stats.__dict__, metrics=metrics)


def _run_strategy_loop(stage: Stage, config: TrainConfig, checked: Checked, run_dir: Path, context: Any, tokenizer: Any, chat: Any, data: Any, memory: PeakMemory) -> dict[str, Any]:
    """Train with the strategy's own loop (``ParallelStrategy.train``), which writes ``model/``."""
    from modelloop.training import Collator, ReportCallback, TrainingData, TrainingJob

    if is_main_process():
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # an earlier attempt's weights are not this run's
    train_set = TrainingData.build(data, max_length=config.max_length, packing=False)
    advise_schedule(config.model_copy(update={"packing": False}), checked.plan, rows=len(train_set), examples=data.stats.examples)
    collator = Collator(tokenizer.pad_token_id, packing=False)
    job = TrainingJob(
        config=config,
        plan=checked.plan,
        model_path=Path(checked.source.base),
        model_config=checked.model_config,
        data=train_set,
        sampler=registry_sampler(config, train_set),
        collator=collator,
        pad_token_id=tokenizer.pad_token_id,
        report=ReportCallback(run_dir / "metrics.jsonl", context.log, tokens=lambda: collator.tokens),
        memory=memory,
        run_dir=run_dir,
    )
    started = time.perf_counter()
    metrics = dict(checked.strategy.train(job))
    seconds = time.perf_counter() - started
    metrics["train_tokens_per_second"] = collator.tokens * checked.plan.dp * checked.plan.mesh.get("ep", 1) / seconds if seconds else 0.0
    if not is_main_process():
        return {"run_dir": str(run_dir), "metrics": metrics}
    return complete_run(run_dir, stage, config, checked, tokenizer, chat, stats=data.stats.__dict__, metrics=metrics, wrapped_as=checked.strategy.name)


def registry_sampler(config: TrainConfig, train_set: Any) -> Any:
    from modelloop.training import RegistrySampler

    sampler = get_registry(SAMPLERS).get(config.sampler)
    modalities = train_set.modalities if sampler.reads_modalities else None
    return RegistrySampler(sampler, train_set.lengths, batch_size=config.batch_size, seed=config.seed, options=config.sampler_options, modalities=modalities)


def image_tokens(checked: Checked, tokenizer: Any, config: TrainConfig) -> Any:
    """A vision-language model's image handling (its family's and its image processor's), or None."""
    from modelloop.data.images import ImageTokens

    return ImageTokens.for_model(checked.family, checked.source.tokenizer, checked.model_config, tokenizer)


def tuner_optimizer(config: TrainConfig, checked: Checked) -> Callable[[Any], Any]:
    """``model -> optimizer`` from the tuner's parameter groups, for the trainer to call
    once the strategy has wrapped the model."""
    from functools import partial

    from modelloop.training import build_optimizer

    return partial(
        build_optimizer,
        tuner=checked.tuner,
        options=checked.options,
        family=checked.family,
        lr=config.lr,
        weight_decay=config.weight_decay,
        betas=(0.9, config.adam_beta2),
        group_lr=config.group_lr,
    )


def _save_pretrained(model: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)

