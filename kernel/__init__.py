"""modelloop: carry an open language model around the fine-tuning loop.

The kernel is small: the hook contract (``modelloop.hooks``), the plugin manager
(``modelloop.plugins``), typed registries (``modelloop.registry``) and the stages that
compose the libraries made for each job. Model families, tuners, rewards and engines
are plugins. Importing this package imports nothing heavy.
"""

from typing import Any

from modelloop.hooks import hookimpl
from modelloop.version import __version__

__all__ = ["__version__", "hookimpl", "load_model", "pt", "rlhf", "sft"]


def sft(config: Any) -> dict[str, Any]:
    """Supervised fine-tuning: a ``TrainConfig`` (or a mapping of its fields) in, a run folder out."""
    from modelloop.stages.train import train

    return train("sft", config)


def pt(config: Any) -> dict[str, Any]:
    """Pre-training or continued pre-training on raw text."""
    from modelloop.stages.train import train

    return train("pt", config)


def rlhf(config: Any) -> dict[str, Any]:
    """Alignment (DPO, KTO, SimPO, ORPO, GRPO): an ``RLHFConfig`` (or a mapping of its fields) in, a run folder out."""
    from modelloop.stages.rlhf import rlhf as run

    return run(config)


def load_model(name_or_path: Any, **options: Any) -> Any:
    """A model folder, hub id or run folder -> ``LoadedModel`` (model, tokenizer, family)."""
    from modelloop.models.loading import load_model as load

    return load(name_or_path, **options)
