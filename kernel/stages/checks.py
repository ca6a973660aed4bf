"""What a training stage (sft, pt, rlhf) checks before its weights load.

Every check that needs no weights, so that a mistake fails in the first second: the
tuner, the names the config gives, the data files, the model's config and family, the
accelerators, the parallel plan, the precision and the attention kernel. ``Checked``
carries what they found into the run (``modelloop.stages.common``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from modelloop.config import ConfigError, TrainConfig, check_tuner
from modelloop.data.sources import DataError, DataSource
from modelloop.data.streaming import StreamSource, is_hub_id
from modelloop.errors import ModelloopError, require_libraries
from modelloop.models.loading import choose_attention, read_config, resolve_family, resolve_model_source
from modelloop.models.precision import Precision
from modelloop.parallel.plan import ParallelPlan
from modelloop.parallel.planner import plan_training
from modelloop.registry import ACCELERATORS, DATASET_FORMATS, SAMPLERS, TEMPLATES, get_registry
from modelloop.specs import Accelerator, ParallelStrategy, Tuner


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
        raise ConfigError(
            f"the {strategy.name} strategy starts from full weights, and {config.model} is an adapter run: merge it first (modelloop export)"
        )
    if strategy.train is not None and (config.freeze or config.group_lr):
        raise ConfigError(
            f"the {strategy.name} strategy trains with its own optimizer: --freeze and per-group rates are not applied there"
        )
    try:
        precision = Precision.for_this_machine(config.dtype)
        half = precision.compute in ("bf16", "fp16")
        attention = choose_attention(
            config.attn_impl, model_config, family, gpu=_cuda_capability(), packing=packed_rows, half=half
        )
    except ModelloopError as error:
        raise ConfigError(str(error)) from None
    return Checked(tuner, options, source, family, model_config, accelerators, strategy, plan, precision, attention)


def check_names(config: TrainConfig) -> None:
    if config.report_to != "none" and importlib.util.find_spec(config.report_to) is None:
        raise ConfigError(
            f"--report-to {config.report_to} needs the {config.report_to} package: pip install {config.report_to}"
        )
    check_sampler(config)
    if config.format:
        get_registry(DATASET_FORMATS).get(config.format)
    if config.template:
        get_registry(TEMPLATES).get(config.template)


def check_data_files(config: TrainConfig) -> None:
    """Every data file is there before a run folder is made for it (a typo in --data must
    not leave a failed run behind). A hub dataset (``hf://``) is training data streamed."""
    for text in [*config.data, *config.eval_data]:
        if is_hub_id(text):
            if not config.streaming or text in config.eval_data:
                raise ConfigError(f"{text}: a hub dataset is read as a stream: train on it with --streaming")
            try:
                StreamSource.parse(text)
            except DataError as error:
                raise ConfigError(str(error)) from None
            continue
        path = DataSource.parse(text).path
        if not path.exists():
            raise ConfigError(f"{path}: no such data file or folder")


def check_sampler(config: TrainConfig) -> None:
    """The sampler exists, takes the options given, and accepts their values (on a
    two-example set of each modality, before any data is read)."""
    sampler = get_registry(SAMPLERS).get(config.sampler)
    unknown = sorted(set(config.sampler_options) - set(sampler.option_names))
    if unknown:
        raise ConfigError(
            f"sampler_options.{unknown[0]}: the {sampler.name} sampler takes {', '.join(sampler.option_names) or 'no options'}"
        )
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
                raise ConfigError(
                    f"the {accelerator.name} accelerator runs on CUDA GPUs only, and this machine has none"
                )
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


def _cuda_capability() -> tuple[int, int] | None:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None
