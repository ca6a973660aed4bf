"""The precision a training stage keeps its weights in and computes with.

On a CUDA GPU ``dtype: auto`` means mixed precision: bf16 where the GPU has it, else fp16
with loss scaling. Weights that stay frozen are loaded in that 16-bit type; trainable ones,
their gradients and optimizer states are fp32; the forward and backward passes run under
autocast, so the products are 16-bit. LoRA adapters thus train in fp32 over a bf16 base,
and full tuning keeps fp32 master weights (loaded in fp32, so an update far smaller than
a weight still lands, which a bf16 weight would round away). ``bf16`` and ``fp16`` ask
for the same mixed precision on any device (fp16's loss scaling needs a GPU), ``fp32``
for fp32 throughout. On a CPU ``auto`` keeps the weights as saved and computes in their
type, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from modelloop.errors import ModelloopError


class PrecisionError(ModelloopError):
    """A precision this machine cannot train in."""


@dataclass(frozen=True)
class Precision:
    """What a stage computes in: ``mixed`` means 16-bit products of fp32 trainable weights.

    :param compute: ``bf16``, ``fp16``, ``fp32``, or ``auto`` (the saved weights' type).
    :param mixed: autocast to ``compute``, trainable weights in fp32, frozen ones in ``compute``.
    """

    compute: str
    mixed: bool

    @classmethod
    def resolve(cls, dtype: str, *, cuda: bool, bf16_supported: bool = True) -> Precision:
        """The precision ``dtype`` (``auto``, ``bf16``, ``fp16``, ``fp32``) means on this device."""
        if dtype == "auto":
            if not cuda:
                return cls("auto", mixed=False)
            dtype = "bf16" if bf16_supported else "fp16"
        if dtype == "fp32":
            return cls("fp32", mixed=False)
        if dtype == "fp16" and not cuda:
            raise PrecisionError("dtype fp16 trains with loss scaling, which needs a CUDA GPU; use bf16 on a CPU")
        if dtype == "bf16" and cuda and not bf16_supported:
            raise PrecisionError("this GPU has no bf16; use dtype fp16 (mixed, with loss scaling) or fp32")
        return cls(dtype, mixed=True)

    @classmethod
    def for_this_machine(cls, dtype: str) -> Precision:
        import torch

        cuda = torch.cuda.is_available()
        return cls.resolve(dtype, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())

    def load_dtype(self, *, trains_base_weights: bool) -> str:
        """The dtype to load the weights in: fp32 master weights when the base weights train
        under mixed precision, the 16-bit type when only adapters do."""
        if self.mixed:
            return "fp32" if trains_base_weights else self.compute
        return self.compute

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """transformers' ``TrainingArguments`` for this precision (autocast, loss scaling).
        Both switches are given, off ones too: TRL's configs turn ``bf16`` on when it is left
        out, which autocast every rlhf run on a CPU to bf16 products (several times slower
        there, and not the precision the manifest records)."""
        return {"bf16": self.mixed and self.compute == "bf16", "fp16": self.mixed and self.compute == "fp16"}

    def place(self, model: Any) -> Any:
        """Under mixed precision, every trainable weight in fp32. Frozen ones stay as loaded:
        16-bit for adapter tuners, except what transformers keeps in fp32 on purpose
        (a model's ``_keep_in_fp32_modules``); quantized ones are left alone.

        Adapter layers that cast their input to their weights' type before the product
        (PEFT's, ``cast_input_dtype_enabled``) are told not to: autocast picks the type of
        the product, and an fp32 copy of every adapted layer's input costs time and memory."""
        import torch

        if self.mixed:
            for parameter in model.parameters():
                if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
                    parameter.data = parameter.data.float()
            for module in model.modules():
                if hasattr(module, "_cast_input_dtype"):
                    module.cast_input_dtype_enabled = False
        return model

    def describe(self) -> str:
        if self.mixed:
            return f"{self.compute} mixed (trainable weights fp32)"
        return "as saved" if self.compute == "auto" else self.compute

    def to_dict(self) -> dict[str, Any]:
        return {"compute": self.compute, "mixed": self.mixed, "trainable": "fp32" if self.mixed else self.compute}
