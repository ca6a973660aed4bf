"""What sft, pt and rlhf share once their checks pass: the process settled, the run
folder (opened or resumed, its manifest kept, handed to the launcher when the plan has
several processes), the model made trainable, the trainer's arguments and optimizer, and
the end of a run (the trainer run to its end, the weights saved, the manifest completed).

The stages call these and these call no stage: ``train`` and ``rlhf`` import this module,
not each other.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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
from modelloop.config import ConfigError, TrainConfig
from modelloop.data.from_logs import read_origin
from modelloop.data.sources import DataSource
from modelloop.data.streaming import is_hub_id
from modelloop.lifecycle import StageContext, stage_lifecycle
from modelloop.models.precision import Precision
from modelloop.parallel.launch import launch, launched_worker
from modelloop.parallel.plan import ParallelPlan, plan_environment
from modelloop.parallel.world import in_worker, is_main_process, rank
from modelloop.plugins import get_plugin_manager
from modelloop.specs import Tuner
from modelloop.stages.checks import Checked


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
    needed = {
        module.split(".")[0]
        for spec in (checked.tuner, checked.strategy, *checked.accelerators)
        for module in spec.requires
    }
    return leave_out(name for name in EAGERLY_IMPORTED if name not in needed)


def run_to_resume(
    stage: str, resume: bool | str | Path, output_dir: Path | None = None
) -> tuple[Path, Path | None] | None:
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


def run_stage(
    stage: str, config: TrainConfig, checked: Checked, body: Callable[[Path, Any, Any], dict[str, Any]]
) -> dict[str, Any]:
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
        raise ConfigError(
            "every rank must write to one run folder: give --output-dir (on a filesystem every node shares)"
        )
    with plan_environment(plan):
        if launching and world.node_rank > 0:  # another node's launcher: node 0 keeps the run folder
            return launch(stage, config, plan, config.output_dir)
        continuing = run_to_resume(stage, config.resume, config.output_dir)
        if in_worker() and rank() > 0:
            return body(
                config.output_dir,
                StageContext(stage, config.model_dump(mode="json"), config.output_dir, get_plugin_manager()),
                continuing,
            )
        run_dir = continuing[0] if continuing else new_run_dir(stage, config.output_dir)
        resolved = config.model_dump(mode="json")
        manager = get_plugin_manager()
        # the launcher recorded the config as the user gave it
        recorded = {} if launched_worker() else {"config": resolved}
        update_manifest(
            run_dir,
            id=run_id(run_dir),
            stage=stage,
            status="running",
            parent=checked.source.parent,
            base_model=checked.source.base,
            base_model_hub=checked.source.hub,
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


def load_trainable(
    config: TrainConfig, checked: Checked, run_dir: Path, *, onednn: bool = False, reward_head: bool = False
) -> Any:
    """The model loaded, accelerated and prepared by the tuner, ready to train; ``onednn``:
    its linear layers multiply with oneDNN (``modelloop.stages.train.multiplies_with_onednn``);
    ``reward_head``: as a reward model (``load_model``).

    An adapter run as the starting point is folded into its base first. When the new
    tuner trains an adapter too, that merged base is saved in the run (``base/``) and is
    the run's ``base_model``: the new adapter belongs on it, not on the original base.
    """
    import torch

    from modelloop.models.checkpointing import checkpoint_layers
    from modelloop.models.cpu_linear import multiply_with_onednn
    from modelloop.models.loading import load_model, merged_model

    tuner, options, plan, precision = checked.tuner, checked.options, checked.plan, checked.precision
    extra = {**(tuner.load_options(options) if tuner.load_options else {}), **plan.load_options}
    dtype = precision.load_dtype(trains_base_weights=not tuner.adapter)
    torch.manual_seed(config.seed)  # weights new to the checkpoint (a reward head) start the same each run
    loaded = load_model(
        config.model,
        dtype=dtype,
        attn_implementation=checked.attention,
        trust_remote_code=config.trust_remote_code,
        reward_head=reward_head,
        **extra,
    )
    model = loaded.model
    if loaded.tuner is not None:  # continuing from an adapter run: train on its merged weights
        model = merged_model(loaded)
        if tuner.adapter:
            if is_main_process():
                model.save_pretrained(merged_base(run_dir), safe_serialization=True)
                update_manifest(run_dir, base_model=str(merged_base(run_dir).resolve()), base_model_hub=None)
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


def merged_base(run_dir: Path) -> Path:
    """Where a run keeps the merged base its adapter was trained on (see ``load_trainable``)."""
    return run_dir / "base"


def record_module_groups(model: Any, config: TrainConfig, checked: Checked, run_dir: Path) -> None:
    """Print what each module group trains, and at what rate, and keep it in the manifest."""
    from modelloop.models.groups import describe

    groups = checked.family.module_groups
    if not groups or not is_main_process():
        return
    summary = describe(model, groups, config.group_lr, config.lr)
    for name, numbers in summary.items():
        state = f"trained at lr {numbers['lr']:g}" if numbers["trainable"] else "frozen"
        print(
            f"modelloop: group {name}: {numbers['parameters']:,} parameters, {numbers['trainable']:,} trainable, {state}"
        )
    update_manifest(run_dir, module_groups=summary)


def advise_schedule(
    config: TrainConfig, plan: ParallelPlan, *, rows: int, examples: int, rows_a_batch_row: int = 1
) -> None:
    """Warn, before the first step, when the schedule cannot learn much from the data
    (``modelloop.schedule``). ``rows_a_batch_row``: batch rows one training row takes
    (GRPO's batch counts completions, ``num_generations`` to a prompt)."""
    from modelloop.log import warn_once
    from modelloop.schedule import schedule_advice

    rows_per_step = max(1, config.batch_size * config.grad_accum * plan.dp // rows_a_batch_row)
    advice = schedule_advice(
        rows=rows,
        examples=examples,
        rows_per_step=rows_per_step,
        max_steps=config.max_steps,
        epochs=config.epochs,
        packed=config.packing,
    )
    if advice and is_main_process():
        warn_once(advice)


def trainer_arguments(
    config: TrainConfig, run_dir: Path, *, evaluating: bool, plan: ParallelPlan | None = None
) -> dict[str, Any]:
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
    update_manifest(
        run_dir, compute={"precision": checked.precision.to_dict(), "attention": checked.attention, "loss": loss}
    )


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


def media_tokens(checked: Checked, tokenizer: Any) -> Any:
    """A multimodal model's media handling (its family's and its processors'), or None."""
    from modelloop.models.loading import load_media_tokens

    return load_media_tokens(checked.family, checked.source.tokenizer, checked.model_config, tokenizer)


def run_trainer(trainer: Any, resume: Any, run_dir: Path) -> tuple[dict[str, Any], float]:
    """Run ``trainer`` to its end, from the checkpoint ``resume`` names (``resume_point``),
    without transformers' own progress printer. Returns the run's metrics (the trainer's
    numbers, and the train loss over every attempt of a resumed run) and the seconds it
    trained. Stopped by Ctrl-C, it saves the step it was on and raises ``KeyboardInterrupt``
    (``StopWithCheckpoint``): the run is then stopped, and ``--resume`` goes on from there."""
    from transformers import PrinterCallback

    from modelloop.training import StopWithCheckpoint, latest_checkpoint, resume_point, step_of, whole_run_losses

    trainer.remove_callback(PrinterCallback)
    stop = StopWithCheckpoint()
    trainer.add_callback(stop)
    with stop.catching():  # from the line that says where the run resumes
        checkpoint = resume_point(resume, run_dir)
        started = time.perf_counter()
        outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - started
    if stop.requested:
        stopped = f"stopped at step {trainer.state.global_step}, saved in {latest_checkpoint(run_dir / 'checkpoints')}"
        print(f"modelloop: {stopped}; --resume {run_dir} goes on from there", file=sys.stderr, flush=True)
        raise KeyboardInterrupt(stopped)
    metrics: dict[str, Any] = {key: value for key, value in outcome.metrics.items() if isinstance(value, (int, float))}
    metrics.update(
        whole_run_losses(
            run_dir / "metrics.jsonl", outcome.training_loss, step_of(checkpoint), trainer.state.global_step
        )
    )
    return metrics, seconds


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
    merged: bool = False,
) -> dict[str, Any]:
    """Save the weights (or adapter) with the tokenizer and chat template, draw the plots,
    and complete the manifest. Every rank calls it: when the plan split the weights
    (ZeRO-3, FSDP, tensor parallel) the trainer gathers them from all ranks into one
    ordinary folder; rank 0 writes. ``merged``: an adapter is folded into the weights
    saved (a reward model, whose users load one folder)."""
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
        # the trainer's, not the model's (config.json holds ours)
        (model_dir / TRAINING_ARGS_NAME).unlink(missing_ok=True)
    elif merged and checked.tuner.merge is not None:
        checked.tuner.merge(trainer.accelerator.unwrap_model(trainer.model)).save_pretrained(
            model_dir, safe_serialization=True
        )
    else:
        save_trained(checked.tuner, trainer.accelerator.unwrap_model(trainer.model), model_dir)
    return complete_run(
        run_dir,
        stage,
        config,
        checked,
        tokenizer,
        chat,
        stats=stats,
        metrics=metrics,
        wrapped_as=type(trainer.model_wrapped).__name__,
    )


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
    if checked.family.multimodal:  # the next stage reads pictures and sound as this one did
        from modelloop.models.loading import save_processors

        save_processors(checked.family, checked.source.tokenizer, model_dir)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    # a hub dataset (streamed) is named as given: it has no file to hash
    sources = [DataSource.parse(f).path for f in [*config.data, *config.eval_data] if not is_hub_id(f)]
    update_manifest(
        run_dir,
        status="completed",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        adapter=checked.tuner.adapter,
        data={
            "files": {str(path.resolve()): sha256_path(path) for path in sources},
            "train": [f if is_hub_id(f) else str(DataSource.parse(f).path.resolve()) for f in config.data],
            # data made of a served model's answers (data from-logs): the runs they came from
            "origins": {str(path.resolve()): origin for path in sources if (origin := read_origin(path)) is not None},
            "stats": dict(stats),
        },
        metrics=metrics,
        files=hashed_files(model_dir),
        parallel={**plan.to_dict(), "wrapped_as": wrapped_as},
    )
    losses = (
        f"train loss: mean {metrics['train_loss']:.4f}, last {metrics['train_loss_last']:.4f}"
        if "train_loss_last" in metrics
        else "no train loss logged"
    )
    print(f"modelloop: {stage} finished: {run_dir} ({losses})")
    return {"run_dir": str(run_dir), "metrics": metrics}


def save_trained(tuner: Tuner, model: Any, directory: Path) -> None:
    """What the tuner trained, saved its way: an adapter, or the whole model."""
    if tuner.save is not None:
        tuner.save(model, directory)
    else:
        model.save_pretrained(directory, safe_serialization=True)
