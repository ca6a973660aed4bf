"""The fallback model family: any causal LM whose tokenizer carries a chat template.

It claims ``*``, so it is used only when no installed plugin claims a checkpoint's
``model_type``; the loader warns once when that happens. What a family plugin would say
is inferred: the chat template is the tokenizer's own, and LoRA targets every linear
layer (``torch.nn.Linear`` and transformers' ``Conv1D``, the output layer left out: the
rule PEFT's ``all-linear`` applies). When the model leaves either one out, loading says
so in one line each, naming what supplies it: ``--template NAME`` (config ``template``)
for a tokenizer without a chat template, ``--set tuner_options.targets=[...]`` (or
``--tuner full``) for a model without linear layers that rule finds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelloop.hooks import hookimpl
from modelloop.log import warn_once
from modelloop.specs import ModelFamily


def load(path: str, *, config: Any, **options: Any) -> tuple[Any, Any]:
    """The model and tokenizer through transformers' Auto classes, as the kernel's own
    loader takes them, then one warning for each thing it could not infer."""
    from transformers import AutoModelForCausalLM

    from modelloop.errors import ModelLoadError
    from modelloop.models.loading import load_tokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **options)
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot load the weights ({error})") from None
    tokenizer = load_tokenizer(path, trust_remote_code=bool(options.get("trust_remote_code")))
    for line in not_inferred(model, tokenizer, path):
        warn_once(line)
    return model, tokenizer


def not_inferred(model: Any, tokenizer: Any, where: str | Path) -> list[str]:
    """What the generic family cannot infer for this model, each as one line that says
    how to supply it."""
    model_type = getattr(model.config, "model_type", "?")
    lines = []
    if not getattr(tokenizer, "chat_template", None):
        lines.append(
            f"{where}: the tokenizer has no chat template and the generic family has none for model type "
            f"{model_type!r}; to train or chat on conversations name one with --template NAME "
            "(config: template; `modelloop plugins` lists them)"
        )
    if not linear_layers(model):
        lines.append(
            f"{where}: the generic family finds no linear layers (torch.nn.Linear or Conv1D) to put LoRA on in "
            f"model type {model_type!r}; name the modules with --set tuner_options.targets=[NAME,...] "
            "(config: tuner_options.targets), or train every weight with --tuner full"
        )
    return lines


def linear_layers(model: Any) -> list[str]:
    """The names of the modules LoRA's "every linear layer" takes: ``torch.nn.Linear``
    and transformers' ``Conv1D`` (GPT-2's), the output layer left out."""
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
    ]


GENERIC = ModelFamily(
    name="generic",
    description="any causal LM with a chat template in its tokenizer (fallback)",
    model_types=("*",),
    template=None,
    load=load,
)


@hookimpl
def register_models(register):
    register(GENERIC)
