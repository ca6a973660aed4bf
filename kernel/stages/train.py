"""``sft`` and ``pt``: supervised fine-tuning and (continued) pre-training.

Everything that can be checked without a model is checked first, in this order, so a
mistake fails in the first second: the config's values, the tuner and its options and
libraries, the sampler and format names, the model's config (max_length against its
context), then every data record. Only then are the weights loaded. The stage writes a
run folder: ``model/`` (adapter or full weights, safetensors, with the tokenizer and the
chat template it was trained with), ``config.json`` (resolved), ``metrics.jsonl``,
``loss.png``, ``checkpoints/`` and ``manifest.json``.

The checks live in ``modelloop.stages.checks``; the run folder, the trainable model and
the end of a run, which ``rlhf`` shares, in ``modelloop.stages.common``.

With ``streaming`` the data is not read before training: a ``modelloop.data.streaming.Stream``
reads, checks and tokenises it as training goes, in one process, and each checkpoint
keeps where it stands, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from modelloop.config import ConfigError, TrainConfig, build_config
from modelloop.parallel.memory import PeakMemory
from modelloop.parallel.plan import ParallelPlan
from modelloop.parallel.world import in_worker, is_main_process
from modelloop.registry import SAMPLERS, get_registry
from modelloop.stages.checks import Checked, check_training
from modelloop.stages.common import (
    advise_schedule,
    complete_run,
    finish_run,
    load_trainable,
    media_tokens,
    record_compute,
    record_module_groups,
    run_stage,
    run_trainer,
    settle_owned_process,
    trainer_arguments,
    tuner_optimizer,
)

Stage = Literal["sft", "pt"]
KIND = {"sft": "conversation", "pt": "text"}


def train(stage: Stage, config: TrainConfig | Mapping[str, Any], *, owns_process: bool = False) -> dict[str, Any]:
    """Run a training stage; returns the run's final metrics and folder. ``owns_process``:
    nothing runs in this process after the stage (``settle_owned_process``)."""
    if not isinstance(config, TrainConfig):
        config = build_config(TrainConfig, config)
    config = settle_memory_settings(config)
    checked = check_training(config, packed_rows=config.packing or config.padding_free)
    if config.streaming:
        check_streaming(stage, config, checked)
    if owns_process:
        settle_owned_process(config, checked)

    def body(run_dir: Path, context: Any, continuing: Any) -> dict[str, Any]:
        with contextlib.ExitStack() as cleanup:  # a data stream's reader stops with the stage
            return _run(stage, config, checked, run_dir, context, resume=continuing, cleanup=cleanup)

    return run_stage(stage, config, checked, body)


def check_streaming(stage: Stage, config: TrainConfig, checked: Checked) -> None:
    """What a streaming run needs, before a run folder is made: one process training with
    the Trainer's loop, and every source readable up to its first good record."""
    from modelloop.data.streaming import check_sources

    if checked.plan.world.size > 1:
        raise ConfigError(
            f"streaming reads the data in one process, and this plan has {checked.plan.world.size}: train with --nproc 1, or without streaming"
        )
    if checked.strategy.train is not None:
        raise ConfigError(
            f"the {checked.strategy.name} strategy trains with its own loop over data read beforehand: leave streaming off"
        )
    check_sources(config.data, kind=KIND[stage], format=config.format, skip_bad_records=config.skip_bad_records)


def open_stream(config: TrainConfig, kind: str, encoder: Any, run_dir: Path, resume: Any) -> Any:
    """The data stream of a streaming run, at the position its checkpoint saved when the run
    resumes from one; packed and ordered as the pre-tokenised path would (``arrange_items``)."""
    from modelloop.data.streaming import Stream, read_position
    from modelloop.training import arrange_items, latest_checkpoint

    checkpoint = (resume[1] or latest_checkpoint(run_dir / "checkpoints")) if resume else None
    settings = {
        "packing": config.packing,
        "batch_size": config.batch_size,
        "sampler": config.sampler,
        "sampler_options": config.sampler_options,
    }
    arrange = functools.partial(
        arrange_items,
        max_length=config.max_length,
        packing=config.packing,
        sampler=get_registry(SAMPLERS).get(config.sampler),
        batch_size=config.batch_size,
        options=config.sampler_options,
    )
    return Stream(
        config.data,
        encoder,
        arrange,
        kind=kind,
        max_length=config.max_length,
        buffer_size=config.stream_buffer,
        format=config.format,
        truncation=config.truncation,
        skip_bad_records=config.skip_bad_records,
        seed=config.seed,
        settings=settings,
        position=read_position(checkpoint) if checkpoint else None,
    )


def streamed_stats(trainer: Any) -> dict[str, Any]:
    """What the stream read, up to the end of the buffer the last batch trained came from
    (its counts cover every pass over the data; bad records are counted on the first)."""
    from dataclasses import asdict

    from modelloop.data.tokenize import DataStats

    position = trainer.stream_position
    if position is None:
        return {**asdict(DataStats()), "streamed": True}
    start = position.buffer.start
    return {**asdict(position.buffer.stats), "streamed": True, "pass": start.epoch + 1, "buffer": start.number + 1}


def settle_memory_settings(config: TrainConfig) -> TrainConfig:
    """The memory settings the user left unset: on a GPU chosen from the memory plan
    (``modelloop.parallel.planner.choose_unset``, what ``modelloop plan`` reports),
    elsewhere gradient checkpointing off and the batch as configured."""
    import torch

    from modelloop.parallel.planner import choose_unset

    if not torch.cuda.is_available() or in_worker():  # a worker runs the settings its launcher chose
        return (
            config.model_copy(update={"gradient_checkpointing": False})
            if config.gradient_checkpointing is None
            else config
        )
    settled, chosen = choose_unset(config, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    if chosen and is_main_process():
        print(f"modelloop: memory plan: {', '.join(chosen)}")
    return settled


def multiplies_with_onednn(config: TrainConfig, plan: ParallelPlan) -> bool:
    """Whether sft and pt multiply the linear layers with oneDNN (``modelloop.models.cpu_linear``):
    on a CPU, as asked (``auto``: where batches come in few shapes, and torch's BLAS is not
    MKL on an Intel processor, which multiplies as fast there), and with whole weights
    and gradients on every rank (a strategy that splits them keeps torch's own layers).
    rlhf asks it only for the methods whose TRL collator pads to a multiple of a width
    (``modelloop.stages.rlhf.ONEDNN_METHODS``): oneDNN keeps compiled code for every shape
    it meets."""
    import torch

    from modelloop.models.cpu_linear import AUTO_UNPACKED_LENGTH, blas_tuned_for_this_cpu, onednn_available

    if config.cpu_matmul == "blas":
        return False
    if config.cpu_matmul == "auto" and (
        blas_tuned_for_this_cpu() or (not config.packing and config.max_length > AUTO_UNPACKED_LENGTH)
    ):
        return False
    return not torch.cuda.is_available() and plan.shard == 0 and plan.mesh.get("tp", 1) == 1 and onednn_available()


def output_layer_loss(model: Any, checked: Checked) -> tuple[Any, str]:
    """How sft and pt compute the loss, and in words: in the output layer, with an
    accelerator's fused kernel or the built-in chunked one (``modelloop.models.output_loss``),
    or, where that cannot be, the model's own loss from the logits at labelled positions."""
    from modelloop.models.output_loss import OutputLayerLoss, reason_plan_keeps_it, unsupported_reason

    reason = reason_plan_keeps_it(checked.plan) or unsupported_reason(model)
    if reason is not None:
        return None, f"from the model's logits at labelled positions ({reason})"
    fused = next(
        (accelerator for accelerator in checked.accelerators if accelerator.linear_cross_entropy is not None), None
    )
    if fused is not None:
        return OutputLayerLoss(
            model, fused.linear_cross_entropy
        ), f"in the output layer, {fused.name}'s fused linear cross-entropy"
    return OutputLayerLoss(model), "in the output layer, chunked linear cross-entropy"


def _run(
    stage: Stage,
    config: TrainConfig,
    checked: Checked,
    run_dir: Path,
    context: Any,
    *,
    resume: Any,
    cleanup: contextlib.ExitStack,
) -> dict[str, Any]:
    from transformers import TrainingArguments

    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import Encoder, prepare_data
    from modelloop.models.cpu_linear import ROW_MULTIPLE
    from modelloop.models.loading import load_tokenizer
    from modelloop.training import (
        Collator,
        MeasureFromFirstStep,
        ModelloopTrainer,
        ReportCallback,
        StreamingData,
        TrainingData,
    )

    kind = KIND[stage]
    tokenizer = load_tokenizer(checked.source.tokenizer, trust_remote_code=config.trust_remote_code)
    chat = (
        resolve_chat_format(tokenizer, checked.family, config.template, config.template_options)
        if kind == "conversation"
        else None
    )
    media = media_tokens(checked, tokenizer)
    data_options = {
        "kind": kind,
        "format": config.format,
        "truncation": config.truncation,
        "skip_bad_records": config.skip_bad_records,
        "seed": config.seed,
        "media": media,
    }
    stream, data = None, None
    if config.streaming:  # read as training goes, from the background
        encoder = Encoder(tokenizer, chat if kind == "conversation" else None, media)
        stream = cleanup.enter_context(open_stream(config, kind, encoder, run_dir, resume))
    else:
        data = prepare_data(config.data, tokenizer, chat, max_length=config.max_length, **data_options)
    evaluation = (
        prepare_data(config.eval_data, tokenizer, chat, max_length=config.max_length, **data_options)
        if config.eval_data
        else None
    )
    if is_main_process():
        print(
            f"modelloop: data: {stream.describe()}"
            if stream is not None
            else f"modelloop: data: {data.stats.summary()}{' (cached)' if data.from_cache else ''}"
        )

    memory = PeakMemory()
    if checked.strategy.train is not None:
        return _run_strategy_loop(stage, config, checked, run_dir, context, tokenizer, chat, data, memory)
    onednn = multiplies_with_onednn(config, checked.plan)
    model = load_trainable(config, checked, run_dir, onednn=onednn)
    record_module_groups(model, config, checked, run_dir)
    train_set = (
        StreamingData(stream)
        if stream is not None
        else TrainingData.build(data, max_length=config.max_length, packing=config.packing)
    )
    eval_set = (
        TrainingData.build(evaluation, max_length=config.max_length, packing=config.packing) if evaluation else None
    )
    if config.eval_split:
        eval_set, train_set = train_set.split(config.eval_split, config.seed)
    if data is not None:
        advise_schedule(config, checked.plan, rows=len(train_set), examples=data.stats.examples)
    # oneDNN compiles code for each shape it meets: padded rows come in few (``cpu_linear``)
    padding_free = not config.packing and config.padding_free and not onednn
    rope_index = None
    if media is not None and (config.packing or padding_free) and media.rope_index is not None:
        rope_index = functools.partial(media.rope_index, model)
    multiple = math.lcm(checked.plan.mesh.get("cp", 1), ROW_MULTIPLE if onednn else 1)
    collator = Collator(
        tokenizer.pad_token_id,
        config.packing,
        multiple=multiple,
        media=media,
        rope_index=rope_index,
        padding_free=padding_free,
    )
    sampler = registry_sampler(config, train_set) if stream is None else None
    # a stream is resumed from the position its checkpoint keeps, not by skipping batches
    streamed = {"ignore_data_skip": True, "accelerator_config": {"dispatch_batches": False}} if stream else {}
    arguments = TrainingArguments(
        **trainer_arguments(config, run_dir, evaluating=eval_set is not None, plan=checked.plan),
        prediction_loss_only=True,
        **streamed,
    )
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
    if stream is not None:
        stream.wait_ready()
    metrics, train_seconds = run_trainer(trainer, resume, run_dir)
    if eval_set is not None:
        metrics.update(trainer.evaluate())
        report.on_log(
            arguments,
            trainer.state,
            trainer.control,
            logs={key: v for key, v in metrics.items() if key.startswith("eval_")},
        )
    # each dp rank reads its own batches
    metrics["train_tokens_per_second"] = collator.tokens * checked.plan.dp / train_seconds if train_seconds else 0.0
    metrics.update(memory.measured())
    stats = data.stats.__dict__ if data is not None else streamed_stats(trainer)
    if trainer.stream_position is not None and is_main_process():
        print(f"modelloop: data: read as it streamed: {trainer.stream_position.buffer.stats.summary()}")
    return finish_run(run_dir, stage, config, checked, trainer, tokenizer, chat, stats=stats, metrics=metrics)


def _run_strategy_loop(
    stage: Stage,
    config: TrainConfig,
    checked: Checked,
    run_dir: Path,
    context: Any,
    tokenizer: Any,
    chat: Any,
    data: Any,
    memory: PeakMemory,
) -> dict[str, Any]:
    """Train with the strategy's own loop (``ParallelStrategy.train``), which writes ``model/``."""
    from modelloop.training import Collator, ReportCallback, TrainingData, TrainingJob

    if is_main_process():
        shutil.rmtree(run_dir / "model", ignore_errors=True)  # an earlier attempt's weights are not this run's
    train_set = TrainingData.build(data, max_length=config.max_length, packing=False)
    advise_schedule(
        config.model_copy(update={"packing": False}), checked.plan, rows=len(train_set), examples=data.stats.examples
    )
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
    metrics["train_tokens_per_second"] = (
        collator.tokens * checked.plan.dp * checked.plan.mesh.get("ep", 1) / seconds if seconds else 0.0
    )
    if not is_main_process():
        return {"run_dir": str(run_dir), "metrics": metrics}
    return complete_run(
        run_dir,
        stage,
        config,
        checked,
        tokenizer,
        chat,
        stats=data.stats.__dict__,
        metrics=metrics,
        wrapped_as=checked.strategy.name,
    )


def registry_sampler(config: TrainConfig, train_set: Any) -> Any:
    from modelloop.training import RegistrySampler

    sampler = get_registry(SAMPLERS).get(config.sampler)
    modalities = train_set.modalities if sampler.reads_modalities else None
    return RegistrySampler(
        sampler,
        train_set.lengths,
        batch_size=config.batch_size,
        seed=config.seed,
        options=config.sampler_options,
        modalities=modalities,
    )
