"""Linear layers multiplied by oneDNN on a CPU.

torch multiplies fp32 matrices on a CPU with its BLAS, which in the x86 wheels is MKL, and
MKL runs its AVX-512 code on Intel processors only. oneDNN ships in the same torch, picks
its code by the processor's features, and on this project's AMD EPYC machines multiplies
a small model's linear-layer shapes 2.2x as fast, in fp32 all the same
(``bench/cpu_matmul.py``). It has no autograd formula in torch, so the layers here carry
their own: the input's gradient is the same kind of product, and so is the weight's.

oneDNN compiles code for each matrix shape it meets and keeps it, about 0.4 MiB a shape
(measured). The output layer stays with torch: its rows are a batch's labelled positions,
a different count every step. Batches of unpacked rows are padded to a multiple of
``ROW_MULTIPLE`` tokens, so that a few row lengths come up instead of one per length: on
the peer-baseline run that keeps 45 MiB of compiled code out of the peak, at no cost in
speed. Rows of many lengths still meet many shapes, and the heap fragments around the
compiled code: a review measured 1.9 GiB more for 128 row counts of Qwen2.5-0.5B's layers
(0.1 GiB with BLAS). So ``cpu_matmul: auto`` takes oneDNN for packed rows (all of one
length) and for unpacked ones up to ``AUTO_UNPACKED_LENGTH`` tokens only.

On Intel processors MKL runs its own best code, and ``auto`` leaves the products to it:
on a Xeon with AMX (2026-12-07) MKL multiplied these shapes at 1.0-1.2x oneDNN's speed
(``bench/cpu_matmul.py``), and without the layers here the peer baseline's SFT at its
settings trained in 24.6 s against 29.8 (``bench/sft_throughput.py``), its DPO in 2.6 s
against 3.0 (``bench/dpo_throughput.py``); packed rows ran alike either way.
"""

from __future__ import annotations

from typing import Any

import torch  # this module is imported only where a model is trained

#: unpacked rows are padded to a multiple of this many tokens where oneDNN multiplies.
ROW_MULTIPLE = 8
#: ``cpu_matmul: auto`` picks oneDNN for unpacked rows up to this long (64 row widths at
#: most); longer ones come in too many shapes, and BLAS is used.
AUTO_UNPACKED_LENGTH = 512


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def blas_tuned_for_this_cpu() -> bool:
    """Whether torch's BLAS is MKL on an Intel processor: MKL picks its code by the
    processor's vendor, and there runs its fastest."""
    return torch.backends.mkl.is_available() and cpu_vendor() == "GenuineIntel"


def cpu_vendor() -> str | None:
    """The processor's vendor as Linux reports it (``GenuineIntel``, ``AuthenticAMD``), or None."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def multiply_with_onednn(model: Any) -> int:
    """Make every fp32 ``torch.nn.Linear`` of ``model`` on the CPU but the output layer
    multiply with oneDNN; returns how many. Subclasses (quantized layers) are left alone;
    the weights, their names and the saved files do not change."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    count = 0
    for module in model.modules():
        if module is output:
            continue
        if (
            type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
        ):
            module.__class__ = OneDNNLinear
            count += 1
    return count


def product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (strided views are read as they are)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class LinearProduct(torch.autograd.Function):
    """A linear layer's product with its own backward pass: oneDNN's op has none in torch."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return product(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = product(grad, weight.t())
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = product(rows.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(torch.nn.Linear):
    """A ``torch.nn.Linear`` whose fp32 CPU products, forward and backward, run through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._multiplies(x):
            return super().forward(x)
        return LinearProduct.apply(x, self.weight, self.bias)

    def _multiplies(self, x: torch.Tensor) -> bool:
        """Anything else goes as torch does it: other dtypes and devices, empty inputs,
        sharded (DTensor) weights, CPU autocast (which would cast to bf16), and graphs
        torch.compile traces (its oneDNN lowering takes frozen weights only)."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() > 0
            and type(self.weight.data) is torch.Tensor
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        )
