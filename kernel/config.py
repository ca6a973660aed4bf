"""Stage configurations: validated before anything heavy happens.

A config comes from defaults < a YAML file (``--config``) < ``--set key=value`` < explicit
flags. Unknown keys, negative learning rates, zero ranks and the like are refused with
one line naming the key, before a model or a data file is opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from modelloop.errors import ModelloopError, require_libraries
from modelloop.specs import Tuner


class ConfigError(ModelloopError):
    """A configuration that cannot work: a bad value, an unknown key, an unreadable file."""


class TrainConfig(BaseModel):
    """What ``modelloop sft`` and ``modelloop pt`` take."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="model folder, hub id, or run folder to start from")
    data: list[str] = Field(min_length=1, description="data files; file#0.5 samples half of one")
    eval_data: list[str] = Field(default_factory=list, description="evaluation files")
    eval_split: float = Field(0.0, ge=0.0, lt=1.0, description="share of the data held out for evaluation")
    eval_steps: int | None = Field(None, gt=0, description="evaluate every N steps (default: at the end)")
    format: str | None = Field(None, description="force a data format")
    tuner: str = Field(
        "lora",
        description="how weights are trained: full, lora, dora, qlora, galore, ... (see modelloop plugins --hook register_tuners)",
    )
    tuner_options: dict[str, Any] = Field(default_factory=dict, description="rank, alpha, targets, ... of the tuner")
    epochs: float = Field(1.0, gt=0, description="passes over the data")
    max_steps: int | None = Field(None, gt=0, description="stop after N optimizer steps (overrides epochs)")
    batch_size: int = Field(8, gt=0, description="rows per step on each process (grpo: completions)")
    grad_accum: int = Field(1, gt=0, description="batches added up into one optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    freeze: list[str] = Field(
        default_factory=list, description="module groups of the family left untrained (vision, aligner, llm, ...)"
    )
    group_lr: dict[str, float] = Field(
        default_factory=dict,
        description="learning rate per module group (vision, aligner, llm); other groups train at lr",
    )
    max_length: int = Field(1024, gt=0, description="tokens per row; longer examples are cut as truncation says")
    packing: bool = True
    padding_free: bool = Field(
        True,
        description="with packing off: each step's examples side by side in rows no wider than the longest, kept apart, instead of one row each padded to the longest (where oneDNN multiplies on a CPU, padded)",
    )
    sampler: str = Field(
        "random", description="the order rows are taken in: random, length_grouped, modality_balanced, ..."
    )
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="the sampler's options (image_share of modality_balanced)"
    )
    truncation: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="an example longer than max_length: cut it, leave it out, or stop"
    )
    skip_bad_records: bool = False
    streaming: bool = Field(
        False,
        description="read, check and tokenise the data as training goes, in memory that does not grow with it (sft and pt; needs max_steps; data may be hf://org/name[:config][@split])",
    )
    stream_buffer: int = Field(
        10_000,
        gt=0,
        description="streaming: examples packed and shuffled together (a resumed run reads one buffer again)",
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="recompute activations in the backward pass; unset: on a GPU when the memory plan needs it, else off",
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="auto: bf16 mixed precision on a GPU (fp16 where it has no bf16), as saved on a CPU; bf16/fp16: mixed precision (trainable weights fp32)",
    )
    attn_impl: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"] = Field(
        "auto",
        description="auto: flash attention if installed, else flex attention for packed rows, on a GPU; sdpa on a CPU",
    )
    accelerators: list[str] = Field(default_factory=list, description="kernels to swap in, e.g. liger (GPU)")
    cpu_matmul: Literal["auto", "onednn", "blas"] = Field(
        "auto",
        description="sft/pt, and rlhf's dpo/kto, on a CPU: fp32 linear layers multiply with oneDNN (2.2x MKL on AMD processors) or torch's BLAS; auto: oneDNN where batches come in few shapes, but MKL on Intel processors",
    )
    template: str | None = Field(None, description="chat template (default: the model's own, else its family's)")
    template_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(42, description="seed of the weights drawn, the data order and sampling")
    logging_steps: int = Field(10, gt=0, description="log the loss every N steps")
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int | None = Field(None, gt=0, description="keep the last K checkpoints")
    report_to: Literal["none", "tensorboard", "wandb"] = Field("none", description="also log to tensorboard or wandb")
    nproc: int = Field(1, gt=0, description="processes per node (more than one starts them through torchrun)")
    nnodes: int | None = Field(
        None,
        gt=0,
        description="nodes taking part, each running the same command with its --node-rank (default: SLURM's count, else 1)",
    )
    strategy: str | None = Field(
        None,
        description="parallel strategy: single, ddp, fsdp, deepspeed, tp, ... (default: single, or ddp for several processes)",
    )
    strategy_options: dict[str, Any] = Field(
        default_factory=dict, description="the strategy's options (ZeRO stage, offload, ...)"
    )
    sequence_parallel: int = Field(
        1, gt=0, description="split each row's tokens over this many ranks (fsdp: ring attention; deepspeed: Ulysses)"
    )
    hang_timeout: int = Field(
        600, gt=0, description="seconds a rank waits for the others in a collective before the job is stopped"
    )
    output_dir: Path | None = None
    resume: bool | Path = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_eval_source(self) -> TrainConfig:
        if self.eval_split and self.eval_data:
            raise ValueError("give eval_data or eval_split, not both")
        return self

    @model_validator(mode="after")
    def _streaming(self) -> TrainConfig:
        if self.streaming and self.max_steps is None:
            raise ValueError("streaming needs max_steps: the length of a stream is not known before it is read")
        if self.streaming and self.eval_split:
            raise ValueError("streaming holds no data back: give eval_data instead of eval_split")
        return self

    @model_validator(mode="after")
    def _group_rates(self) -> TrainConfig:
        for group, rate in self.group_lr.items():
            if rate <= 0:
                raise ValueError(f"group_lr.{group} must be positive, got {rate}")
            if group in self.freeze:
                raise ValueError(f"group {group!r} is frozen and has a learning rate: choose one")
        return self


#: RLHF knobs that belong to some methods only: setting one for another method is an error.
METHOD_KNOBS: dict[str, tuple[str, ...]] = {
    "loss_type": ("dpo", "kto", "grpo", "online_dpo"),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "teacher": ("gkd",),
    **{name: ("grpo", "rloo", "online_dpo", "gkd") for name in ("max_completion_length", "temperature", "top_p")},
    **{
        name: ("grpo", "rloo", "online_dpo")
        for name in ("rewards", "reward_weights", "reward_options", "rollout_engine", "rollout_options", "sync_steps")
    },
    **{name: ("grpo", "rloo") for name in ("num_generations", "epsilon", "epsilon_high", "num_iterations")},
    **{
        name: ("grpo",)
        for name in ("scale_rewards", "environment", "environment_options", "max_turns", "max_staleness")
    },
}


class RLHFConfig(TrainConfig):
    """What ``modelloop rlhf`` takes: a training config, the method and the method's knobs.

    Knobs left at None take TRL's default for the method; ``method_options`` passes any
    other field of TRL's config for the method (checked against it).
    """

    method: Literal["dpo", "kto", "simpo", "orpo", "grpo", "rloo", "online_dpo", "gkd", "rm"] = Field(
        "dpo",
        description="dpo, kto, simpo, orpo (preference data), grpo, rloo, online_dpo (prompts and rewards), gkd (prompts and a teacher) or rm (a reward model, from preference data)",
    )
    packing: bool | None = Field(
        None,
        description="dpo: each pair in padding-free rows that compute its prompt once (None: wherever the model allows; true: insist; false: TRL's batches)",
    )
    beta: float | None = Field(
        None,
        ge=0.0,
        description="dpo/kto/simpo/orpo: the method's beta (ORPO's lambda); grpo/rloo: the KL coefficient; gkd: the generalized JSD's interpolation (0 forward KL, 1 reverse KL)",
    )
    loss_type: str | None = Field(
        None,
        description="dpo: sigmoid, ipo, hinge, ...; kto: kto, apo_zero_unpaired; grpo: grpo, dr_grpo, dapo, bnpo, ...; online_dpo: sigmoid, ipo",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo, simpo: the assumed share of flipped preferences"
    )
    simpo_gamma: float = Field(0.5, ge=0.0, description="simpo: the target reward margin")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of the desirable examples' loss")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: weight of the undesirable examples' loss")
    num_generations: int = Field(8, ge=2, description="grpo, rloo: completions per prompt (a group)")
    max_completion_length: int = Field(
        256, gt=0, description="grpo, rloo, online_dpo, gkd: tokens per completion at most"
    )
    temperature: float = Field(
        1.0, gt=0.0, description="grpo, rloo, online_dpo, gkd: sampling temperature of the rollouts"
    )
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="grpo, rloo, online_dpo, gkd: nucleus sampling of the rollouts"
    )
    epsilon: float = Field(0.2, gt=0.0, description="grpo, rloo: the clipping range (lower side)")
    epsilon_high: float | None = Field(
        None, gt=0.0, description="grpo, rloo: the upper clipping bound (DAPO's clip-higher); None = epsilon"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="grpo: how advantages are scaled")
    num_iterations: int = Field(1, ge=1, description="grpo, rloo: optimisation passes over each batch of rollouts")
    rewards: list[str] = Field(
        default_factory=list, description="grpo, rloo, online_dpo: reward names, module:function or file.py:function"
    )
    reward_weights: list[float] | None = Field(
        None, description="grpo, rloo, online_dpo: one weight per reward (default 1 each)"
    )
    reward_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="grpo, rloo, online_dpo: options per reward, by its name in rewards"
    )
    rollout_engine: str = Field(
        "hf",
        description="grpo, rloo, online_dpo: the engine that generates the rollouts (hf, vllm, sglang, ...; trl: TRL's own generate)",
    )
    rollout_options: dict[str, Any] = Field(
        default_factory=dict, description="grpo, rloo, online_dpo: the rollout engine's options"
    )
    sync_steps: int = Field(
        1,
        ge=1,
        description="grpo, rloo, online_dpo: optimizer steps between weight hand-overs to an engine out of process",
    )
    max_staleness: int | None = Field(
        None,
        ge=0,
        description="grpo: generate rollouts while the trainer steps, from weights at most this many steps old (importance-weighted); None: each step waits for its own",
    )
    teacher: str | None = Field(
        None, description="gkd: the teacher, a model folder, hub id or run whose tokenizer is the student's"
    )
    environment: str | None = Field(
        None,
        description="grpo: an environment each completion plays as an episode of several turns (calculator, arithmetic, ...); its reward joins the rewards",
    )
    environment_options: dict[str, Any] = Field(default_factory=dict, description="grpo: the environment's options")
    max_turns: int | None = Field(
        None, ge=1, description="grpo: the model's turns per episode at most (default: the environment's own)"
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="any other field of TRL's config for the method"
    )

    @model_validator(mode="after")
    def _knobs_of_the_method(self) -> RLHFConfig:
        for name, methods in METHOD_KNOBS.items():
            if self.method not in methods and getattr(self, name) != type(self).model_fields[name].get_default(
                call_default_factory=True
            ):
                raise ValueError(f"{name} is for {', '.join(methods)}, not {self.method}")
        if self.packing and self.method != "dpo":
            raise ValueError(f"packing is for dpo's pairs; {self.method} batches its examples as TRL does")
        if self.streaming:
            raise ValueError("rlhf reads its data whole (TRL's trainers): leave streaming off")
        if not self.padding_free:
            raise ValueError("padding_free is for sft and pt: rlhf batches as TRL does (dpo: packing)")
        if self.sequence_parallel > 1:
            raise ValueError(
                "rlhf does not split sequences (TRL's trainers batch rows their own way): leave sequence_parallel at 1"
            )
        if self.beta == 0 and self.method not in ("grpo", "rloo", "online_dpo", "gkd"):
            raise ValueError(f"beta must be above 0 for {self.method}")
        if self.method == "gkd" and self.teacher is None:
            raise ValueError("gkd distils a teacher into the model: set teacher (a model folder, hub id or run)")
        if self.beta is not None and self.method == "rm":
            raise ValueError("beta is for dpo, kto, simpo, orpo and grpo: a reward model has no reference to stay near")
        if self.environment is None and (self.environment_options or self.max_turns is not None):
            raise ValueError("environment_options and max_turns are for an environment: set environment too")
        if self.max_staleness is not None and self.sync_steps != 1:
            raise ValueError(
                "max_staleness bounds how old the rollouts' weights are, handed over at every step: leave sync_steps at 1"
            )
        return self


def parse_assignments(assignments: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``key=value`` pairs (``--set``) as a nested dict; values are read as YAML (``1e-4``, ``true``, ``[a, b]``)."""
    import yaml

    result: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, text = assignment.partition("=")
        if not separator or not key:
            raise ConfigError(f"--set {assignment!r}: expected key=value")
        target = result
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(text) if text else ""
    return result


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    return loaded


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, merging nested mappings (tuner_options, template_options)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_tuner(config: TrainConfig) -> tuple[Tuner, dict[str, Any]]:
    """The tuner, its libraries present and its options valid — before anything loads."""
    from modelloop.registry import TUNERS, get_registry

    tuner = get_registry(TUNERS).get(config.tuner)
    require_libraries(tuner, "tuner")
    try:
        options = dict(tuner.check(config.tuner_options)) if tuner.check else dict(config.tuner_options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"tuner_options for {tuner.name}: {error}") from None
    return tuner, options


def build_config(model: type[BaseModel], *layers: Mapping[str, Any], source: str = "config") -> Any:
    """Validate the merged layers; the first problem becomes one line naming its key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        message = (
            str(problem["ctx"]["error"])
            if problem["type"] == "value_error" and "error" in problem.get("ctx", {})
            else problem["msg"]
        )
        if problem["type"] == "extra_forbidden":
            from difflib import get_close_matches

            close = get_close_matches(str(problem["loc"][-1]), list(model.model_fields), n=1)
            message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
        raise ConfigError(f"{source}: {key}: {message}" if key else f"{source}: {message}") from None
