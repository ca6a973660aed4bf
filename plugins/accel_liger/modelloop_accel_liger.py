"""Liger kernels as a modelloop accelerator (CUDA only).

Liger patches a loaded model instance by its model type (``_apply_liger_kernel_to_instance``);
the model types below are the ones Liger has patch functions for and modelloop has
families for.
"""

from __future__ import annotations

from typing import Any

from modelloop.plugin import Accelerator, hookimpl

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def apply(model: Any, family: Any) -> Any:
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model)
    return model


def linear_cross_entropy(hidden: Any, weight: Any, bias: Any, labels: Any) -> Any:
    """Liger's fused output projection and cross-entropy, summed over the rows given."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, labels, bias=bias, reduction="sum")


LIGER = Accelerator(
    name="liger",
    description="Liger Triton kernels: RMSNorm, RoPE, SwiGLU, fused linear cross-entropy (CUDA)",
    apply=apply,
    model_types=MODEL_TYPES,
    requires=("liger_kernel",),
    needs_cuda=True,
    linear_cross_entropy=linear_cross_entropy,
)


@hookimpl
def register_accelerators(register):
    register(LIGER)
