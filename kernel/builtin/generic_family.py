"""The fallback model family: any causal LM whose tokenizer carries a chat template.

It claims ``*``, so it is used only when no installed plugin claims a checkpoint's
``model_type``; the loader warns once when that happens. LoRA then targets every
linear layer, and the chat template is the tokenizer's own.
"""

from __future__ import annotations

from modelloop.hooks import hookimpl
from modelloop.specs import ModelFamily

GENERIC = ModelFamily(
    name="generic",
    description="any causal LM with a chat template in its tokenizer (fallback)",
    model_types=("*",),
    template=None,
)


@hookimpl
def register_models(register):
    register(GENERIC)
