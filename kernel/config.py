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

from modelloop.errors import ModelloopError


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
    tuner: str = "lora"
    tuner_options: dict[str, Any] = Field(default_factory=dict, description="rank, alpha, targets, ... of the tuner")
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after N optimizer steps (overrides epochs)")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(1e-4, gt=0)
    scheduler: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    max_length: int = Field(1024, gt=0)
    packing: bool = True
    sampler: str = "random"
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    skip_bad_records: bool = False
    gradient_checkpointing: bool = False
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    attn_impl: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    accelerators: list[str] = Field(default_factory=list, description="kernels to swap in, e.g. liger (GPU)")
    template: str | None = None
    template_options: dict[str, Any] = Field(default_factory=dict)
    seed: int = 42
    logging_steps: int = Field(10, gt=0)
    save_steps: int | None = Field(None, gt=0, description="checkpoint every N steps")
    save_total_limit: int | None = Field(None, gt=0, description="keep the last K checkpoints")
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    output_dir: Path | None = None
    resume: bool | Path = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_eval_source(self) -> TrainConfig:
        if self.eval_split and self.eval_data:
            raise ValueError("give eval_data or eval_split, not both")
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


def build_config(model: type[BaseModel], *layers: Mapping[str, Any], source: str = "config") -> Any:
    """Validate the merged layers; the first problem becomes one line naming its key."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        problem = error.errors()[0]
        key = ".".join(str(part) for part in problem["loc"]) or "config"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            from difflib import get_close_matches

            close = get_close_matches(str(problem["loc"][-1]), list(model.model_fields), n=1)
            message = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "")
        raise ConfigError(f"{source}: {key}: {message}") from None
