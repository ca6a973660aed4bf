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

import importlib.util
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
from modelloop.lifecycle import stage_lifecycle
from modelloop.models.loading import read_config, resolve_family, resolve_model_source
from modelloop.plugins import get_plugin_manager
from modelloop.registry import ACCELERATORS, DATASET_FORMATS, SAMPLERS, TEMPLATES, TUNERS, get_registry
from modelloop.specs import Accelerator, Tuner

Stage = Literal["sft", "pt"]
KIND = {"sft": "conversation", "pt": "text"}


def check_tuner(config: TrainConfig) -> tuple[Tuner, dict[str, Any]]:
    """The tuner, its libraries present and its options valid — before anything loads."""
    tuner = get_registry(TUNERS).get(config.tuner)
    for module in tuner.requires:
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"the {tuner.name} tuner needs {module}: pip install {module}")
    try:
        options = dict(tuner.check(config.tuner_options)) if tuner.check else dict(config.tuner_options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"tuner_options for {tuner.name}: {error}") from None
    return tuner, options


def check_names(config: TrainConfig) -> None:
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(f"--report-to {config.report_to} needs the {config.report_to} package: pip install {config.report_to}")
    get_registry(SAMPLERS).get(config.sampler)
    if config.format:
        get_registry(DATASET_FORMATS).get(config.format)
    if config.template:
        get_registry(TEMPLATES).get(config.template)


def check_accelerators(config: TrainConfig, model_type: str) -> list[Accelerator]:
    """Each accelerator installed, supported for this model, and on the hardware it needs."""
    found = []
    for name in config.accelerators:
        accelerator = get_registry(ACCELERATORS).get(name)
        for module in accelerator.requires:
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"the {accelerator.name} accelerator needs {module}: pip install {module}")
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


def train(stage: Stage, config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run a training stage; returns the run's final metrics and folder."""
    if not isinstance(config, TrainConfig):
        config = build_config(TrainConfig, config)
    checked = check_training(config)
    return run_stage(stage, config, checked.source, lambda run_dir, context, continuing: _run(stage, config, checked, run_dir, context, resume=continuing))


@dataclass(frozen=True)
class Checked:
    """What the checks before loading found: the tuner and its options, the model's source,
    family and config, the accelerators."""

    tuner: Tuner
    options: dict[str, Any]
    source: Any
    family: Any
    model_config: Any
    accelerators: list[Accelerator]


def check_training(config: TrainConfig) -> Checked:
    """Every check that needs no weights: names, tuner, model config, context, accelerators."""
    tuner, options = check_tuner(config)
    check_names(config)
    source = resolve_model_source(config.model)
    model_config = read_config(source.base, trust_remote_code=config.trust_remote_code)
    check_context(model_config, config)
    family = resolve_family(model_config.model_type)
    accelerators = check_accelerators(config, model_config.model_type)
    return Checked(tuner, options, source, family, model_config, accelerators)


def run_stage(stage: str, config: TrainConfig, source: Any, body: Callable[[Path, Any, Any], dict[str, Any]]) -> dict[str, Any]:
    """Open (or reopen, to resume) the run folder, run ``body`` inside the stage's lifecycle
    hooks, and record a failure in the manifest."""
    continuing = run_to_resume(stage, config.resume, config.output_dir)
    run_dir = continuing[0] if continuing else new_run_dir(stage, config.output_dir)
    resolved = config.model_dump(mode="json")
    manager = get_plugin_manager()
    update_manifest(
        run_dir,
        id=run_id(run_dir),
        stage=stage,
        status="running",
        parent=source.parent,
        base_model=source.base,
        config=resolved,
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        **environment({name: info.version for name, info in manager.info.items()}),
    )
    write_json_atomic(run_dir / "config.json", resolved)
    with stage_lifecycle(stage, resolved, run_dir, manager) as context:
        try:
            result = body(run_dir, context, continuing)
        except BaseException as error:
            update_manifest(run_dir, status="failed", error=f"{type(error).__name__}: {error}")
            raise
        context.result.update(result)
    return context.result


def load_trainable(config: TrainConfig, checked: Checked, run_dir: Path) -> Any:
    """The model loaded, accelerated and prepared by the tuner, ready to train.

    An adapter run as the starting point is folded into its base first. When the new
    tuner trains an adapter too, that merged base is saved in the run (``base/``) and is
    the run's ``base_model``: the new adapter belongs on it, not on the original base.
    """
    import torch

    from modelloop.models.loading import load_model

    tuner, options = checked.tuner, checked.options
    extra = dict(tuner.load_options(options)) if tuner.load_options else {}
    loaded = load_model(config.model, dtype=config.dtype, attn_implementation=config.attn_impl, trust_remote_code=config.trust_remote_code, **extra)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
        if tuner.adapter:
            model.save_pretrained(merged_base(run_dir), safe_serialization=True)
            update_manifest(run_dir, base_model=str(merged_base(run_dir).resolve()))
    for accelerator in checked.accelerators:
        model = accelerator.apply(model, checked.family)
    if config.gradient_checkpointing:
        _checkpoint_activations(model)
    torch.manual_seed(config.seed)
    model = tuner.prepare(model, options, checked.family)
    model.config.use_cache = False
    return model


def merged_base(run_dir: Path) -> Path:
    """Where a run keeps the merged base its adapter was trained on (see ``load_trainable``)."""
    return run_dir / "base"


def trainer_arguments(config: TrainConfig, run_dir: Path, *, evaluating: bool) -> dict[str, Any]:
    """The transformers ``TrainingArguments`` every stage shares (TRL's configs extend them)."""
    import torch

    return {
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
    }


def finish_run(
    run_dir: Path, stage: str, config: TrainConfig, checked: Checked, model: Any, tokenizer: Any, chat: Any, *, stats: Mapping[str, Any], metrics: dict[str, Any]
) -> dict[str, Any]:
    """Save the weights (or adapter) with the tokenizer and chat template, draw the plots,
    and complete the manifest."""
    from modelloop.training import plot_losses

    model_dir = run_dir / "model"
    (checked.tuner.save or _save_pretrained)(model, model_dir)
    if chat is not None:
        tokenizer.chat_template = chat.source
    tokenizer.save_pretrained(model_dir)
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
    )
    print(f"modelloop: {stage} finished: {run_dir} (train loss {metrics.get('train_loss', float('nan')):.4f})")
    return {"run_dir": str(run_dir), "metrics": metrics}


def _run(stage: Stage, config: TrainConfig, checked: Checked, run_dir: Path, context: Any, *, resume: Any) -> dict[str, Any]:
    from transformers import PrinterCallback, TrainingArguments

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_tokenizer
    from modelloop.training import Collator, ModelloopTrainer, RegistrySampler, ReportCallback, TrainingData, build_optimizer, latest_checkpoint

    kind = KIND[stage]
    tokenizer = load_tokenizer(checked.source.tokenizer, trust_remote_code=config.trust_remote_code)
    chat = resolve_chat_format(tokenizer, checked.family, config.template, config.template_options) if kind == "conversation" else None
    data_options = {"kind": kind, "format": config.format, "truncation": config.truncation, "skip_bad_records": config.skip_bad_records, "seed": config.seed}
    data = prepare_data(config.data, tokenizer, chat, max_length=config.max_length, **data_options)
    evaluation = prepare_data(config.eval_data, tokenizer, chat, max_length=config.max_length, **data_options) if config.eval_data else None
    print(f"modelloop: data: {data.stats.summary()}{' (cached)' if data.from_cache else ''}")

    model = load_trainable(config, checked, run_dir)
    train_set = TrainingData.build(data, max_length=config.max_length, packing=config.packing)
    eval_set = TrainingData.build(evaluation, max_length=config.max_length, packing=config.packing) if evaluation else None
    if config.eval_split:
        eval_set, train_set = train_set.split(config.eval_split, config.seed)
    collator = Collator(tokenizer.pad_token_id, config.packing)
    sampler = RegistrySampler(get_registry(SAMPLERS).get(config.sampler), train_set.lengths, batch_size=config.batch_size, seed=config.seed)
    optimizer = build_optimizer(
        model, checked.tuner, checked.options, checked.family, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, config.adam_beta2)
    )
    arguments = TrainingArguments(**trainer_arguments(config, run_dir, evaluating=eval_set is not None))
    report = ReportCallback(run_dir / "metrics.jsonl", context.log, tokens=lambda: collator.tokens)
    trainer = ModelloopTrainer(
        model=model,
        args=arguments,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        optimizers=(optimizer, None),
        train_sampler=sampler,
        callbacks=[report],
    )
    trainer.remove_callback(PrinterCallback)
    checkpoint = (resume[1] or latest_checkpoint(run_dir / "checkpoints")) if resume else None
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {key: value for key, value in outcome.metrics.items() if isinstance(value, (int, float))}
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        report.on_log(arguments, trainer.state, trainer.control, logs={key: v for key, v in metrics.items() if key.startswith("eval_")})
    metrics["train_tokens_per_second"] = collator.tokens / train_seconds if train_seconds else 0.0
    return finish_run(run_dir, stage, config, checked, model, tokenizer, chat, stats=data.stats.__dict__, metrics=metrics)


def _checkpoint_activations(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them.

    Reentrant checkpointing: on a CPU it makes a LoRA step about a tenth faster than the
    non-reentrant kind (no saved-tensor hooks per operation), and its first pass runs under
    ``no_grad``, which lets a tuner keep what it drew then (the LoRA plugin's dropout mask)
    for the recompute. Enabled before the tuner prepares the model so that the tuner sees
    it; the embeddings' output requires grad so that frozen-base layers still reach the
    adapters.
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()


def _save_pretrained(model: Any, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)

