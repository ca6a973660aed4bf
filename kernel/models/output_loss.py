"""The language-model loss without the full logits.

A causal LM projects every position onto the vocabulary (151,936 entries for Qwen), and
the loss then upcasts those logits to fp32: at 16 k positions a step that is about 10 GB,
and as much again for their gradient, more than a 0.5 B model's weights, gradients and
optimizer states together. Here the loss is computed where the projection happens.
For the length of one forward pass the model's output layer receives the final hidden
states, keeps the positions that predict a label, and returns their cross-entropy,
computed a chunk of positions at a time with the gradients worked out in the same pass,
so no chunk's logits outlive it and nothing is recomputed in the backward pass.

Going through the model's own forward, rather than calling its decoder and projecting
outside, keeps working everything that wraps that forward: PEFT, DDP's gradient hooks, a
family's own multimodal inputs, and an accelerator's patched forward (Liger's, which hands
the output layer every position when no labels are passed). An accelerator may bring a
fused kernel for the same computation (``Accelerator.linear_cross_entropy``: Liger's
fused linear cross-entropy); otherwise the chunked torch version here runs on any device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from modelloop.data.labels import IGNORE

#: Most logits one chunk holds (fp32: 256 MiB; 441 rows of a 151,936 vocabulary): products
#: that large still run at full speed on a GPU, and the chunk stays small beside a 7B
#: model's checkpointed activations.
CHUNK_ELEMENTS = 1 << 26

#: Config fields that make a model transform its logits after the output layer (Gemma's
#: soft-capping, Cohere's and Granite's scales): the loss must then see the real logits.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

LinearCrossEntropy = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, a chunk of
    rows at a time, in the autocast dtype when autocast is on (fp32 softmax either way).
    The gradients are computed chunk by chunk in the forward pass and scaled in the
    backward, as Liger's fused kernel does."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        with_grad: bool,
    ) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        with torch.autocast(device, enabled=False):
            matrix, inputs = weight.to(dtype), hidden.to(dtype)
            offset = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(inputs) if with_grad and hidden.requires_grad else None
            grad_weight = (
                torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                if with_grad and weight.requires_grad
                else None
            )
            grad_bias = (
                torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                if with_grad and bias is not None and bias.requires_grad
                else None
            )
            for start in range(0, inputs.shape[0], rows):
                piece, target = inputs[start : start + rows], labels[start : start + rows]
                logits = (piece @ matrix.t() if offset is None else torch.addmm(offset, piece, matrix.t())).float()
                normaliser = torch.logsumexp(logits, dim=-1)
                total += (normaliser - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if grad_hidden is None and grad_weight is None and grad_bias is None:
                    continue
                probabilities = logits.sub_(normaliser[:, None]).exp_()  # softmax, in the logits' memory
                probabilities[torch.arange(len(target), device=target.device), target] -= 1
                grad_logits = probabilities.to(dtype)
                del logits, probabilities
                if grad_hidden is not None:
                    grad_hidden[start : start + rows] = grad_logits @ matrix
                if grad_weight is not None:
                    grad_weight += grad_logits.t() @ piece
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        scaled = [
            None if grad is None else (grad * grad_output).to(dtype) for grad, dtype in zip(ctx.grads, ctx.dtypes)
        ]
        ctx.grads = ()
        return (*scaled, None, None)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor
) -> torch.Tensor:
    """The summed cross-entropy of the projection of ``hidden`` (rows, hidden size) onto
    ``weight`` (vocabulary, hidden size) against ``labels`` (rows; none ignored), without
    ever holding more than ``CHUNK_ELEMENTS`` logits."""
    with_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, with_grad)


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers model's output layer (through a PEFT wrapper), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    getter = getattr(base, "get_output_embeddings", None)
    return getter() if getter is not None else None


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the loss cannot be computed in this model's output layer, or None when it can:
    the layer must be a plain linear layer with its whole weight on this process, and the
    model must not transform its logits after it."""
    from torch.distributed.tensor import DTensor

    head = output_layer(model)
    if head is None:
        return "the model has no output layer transformers knows of"
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        return f"its output layer is a {type(head).__name__}, not a plain linear layer (trained or quantized)"
    if isinstance(head.weight, DTensor):
        return "its output layer's weight is split over processes"
    configs = [model.config, getattr(model.config, "text_config", None)]
    transforms = [
        name
        for config in configs
        if config is not None
        for name in LOGIT_TRANSFORMS
        if getattr(config, name, None) not in (None, 1, 1.0)
    ]
    if transforms:
        return f"the model transforms its logits after the output layer ({transforms[0]})"
    return None


def reason_plan_keeps_it(plan: Any) -> str | None:
    """Why a parallel plan leaves the loss to the model (its output layer's weight or its
    rows are split over processes), or None."""
    if plan.shard >= 3 or plan.mesh.get("tp", 1) > 1:
        return "the plan splits the output layer's weight over processes"
    if plan.mesh.get("cp", 1) > 1:
        return "the plan splits each row over processes"
    return None


class OutputLayerLoss:
    """A model whose output layer can return the loss instead of the logits."""

    def __init__(self, model: torch.nn.Module, function: LinearCrossEntropy = chunked_linear_cross_entropy) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the loss cannot be computed in this model's output layer: {reason}")
        self.head: torch.nn.Linear = output_layer(model)
        self.function = function

    @contextlib.contextmanager
    def computing(self, shift_labels: torch.Tensor, divisor: torch.Tensor | int | None = None) -> Iterator[None]:
        """While the block runs, the output layer takes the final hidden states (rows,
        positions, hidden size) and returns the cross-entropy of the positions whose
        ``shift_labels`` (rows, positions; already shifted) are not ignored, summed and
        divided by ``divisor`` (default: their count), in place of the logits."""
        keep = shift_labels != IGNORE

        def loss(hidden: torch.Tensor) -> torch.Tensor:
            if hidden.shape[:-1] != keep.shape:
                raise RuntimeError(
                    f"the output layer got hidden states of shape {tuple(hidden.shape)} for labels of shape {tuple(keep.shape)}"
                )
            summed = self.function(hidden[keep], self.head.weight, self.head.bias, shift_labels[keep])
            count = keep.sum() if divisor is None else divisor
            return summed / (count.to(summed.device) if isinstance(count, torch.Tensor) else count)

        previous = self.head.__dict__.get("forward")  # a hook library's own wrapper, kept
        self.head.forward = loss
        try:
            yield
        finally:
            if previous is None:
                del self.head.forward
            else:
                self.head.forward = previous
