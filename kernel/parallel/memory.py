"""Memory per device: what a plan will need (``estimate``) and what a run took (``PeakMemory``).

The estimate counts the model's parameters exactly — the model is built on the meta
device and prepared by the tuner, so LoRA's adapters and frozen layers are what the run
will have — and derives the rest from the plan: what is sharded over how many ranks,
what is offloaded, whether activations are recomputed. Activations follow the tensors a
decoder layer keeps for its backward pass (hidden-size, key/value and MLP-size tensors
per token) and the logits the loss needs; ``bench/parallel_throughput.py`` and the tests
hold the estimate against measured peaks.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelloop.parallel.plan import ParallelPlan

MIB = 2**20
GIB = 2**30

#: bytes per element of each dtype name the configs use.
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

#: Tensors a decoder layer keeps per token for its backward pass, in units of the hidden
#: size (norm inputs and outputs, projections' inputs, attention output, residuals), of
#: the key/value width (keys and values before and after RoPE) and of the MLP width
#: (gate, up, activation and product).
HIDDEN_TENSORS = 10
KV_TENSORS = 4
MLP_TENSORS = 4
#: fp32 copies of the logits the loss keeps (logits, their float upcast, log-softmax).
LOGIT_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by what holds them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    buffers: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.buffers


@dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of the model as the tuner prepares it."""

    total: int  # every parameter, adapters included
    trainable: int
    quantized: int  # frozen linear weights stored in 4 or 8 bits
    largest_layer: int  # parameters of the biggest decoder layer (FSDP's gather unit)
    quantized_bits: int = 16


def count_parameters(
    model_config: Any, tuner: Any, tuner_options: Mapping[str, Any], family: Any, *, trust_remote_code: bool = False
) -> ModelCounts:
    """Build the model on the meta device (no memory, no weights read), let the tuner
    prepare it, and count."""
    import torch

    from modelloop.models.loading import model_class

    with torch.device("meta"):
        model = model_class(family).from_config(model_config, trust_remote_code=trust_remote_code)
        model = tuner.prepare(model, tuner_options, family)
    parameters = list(model.parameters())
    bits = _quantized_bits(tuner, tuner_options)
    quantized = 0
    if bits:
        quantized = sum(
            module.weight.numel()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad and "lm_head" not in name
        )
    layer_classes = getattr(model, "_no_split_modules", None) or ()
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    return ModelCounts(
        total=sum(p.numel() for p in parameters),
        trainable=sum(p.numel() for p in parameters if p.requires_grad),
        quantized=quantized,
        largest_layer=largest,
        quantized_bits=bits or 16,
    )


def estimate(
    plan: ParallelPlan,
    counts: ModelCounts,
    model_config: Any,
    *,
    dtype: str,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    mixed: bool = False,
    loss_in_output_layer: bool = False,
) -> MemoryEstimate:
    """Per-device bytes for one training step of ``batch_size`` rows of ``max_length`` tokens.

    ``mixed``: mixed precision, ``dtype`` being the 16-bit type (trainable weights, their
    gradients and optimizer states in fp32). ``loss_in_output_layer``: the loss holds one
    chunk of logits (``modelloop.models.output_loss``), not all of them."""
    element = element_bytes(dtype, model_config)
    trained = 4 if mixed else element  # bytes per trainable weight, gradient and optimizer state
    # a pipeline stage holds 1/pp of the layers; 1F1B keeps up to pp micro-batches in
    # flight on the first stage, each through 1/pp of them, so activations stay as they are
    split = plan.mesh.get("tp", 1) * plan.mesh.get("pp", 1)  # ranks a weight matrix or its layers are spread over
    shard_group = plan.dp * plan.mesh.get("cp", 1)  # sharding spans the sequence-parallel ranks too
    plain = counts.total - counts.quantized
    frozen = plain - counts.trainable
    # plus a scale per 64-value block
    weights = frozen * element + counts.trainable * trained + counts.quantized * (counts.quantized_bits / 8 + 4 / 64)
    weights /= split * (shard_group if plan.shard >= 3 else 1)
    gradients = counts.trainable * trained / (split * (shard_group if plan.shard >= 2 else 1))
    if "parameters" in plan.offload:  # weights and their gradients live in host memory; the gathered layers are buffers
        weights = gradients = 0
    # torch's AdamW keeps two states in the weights' dtype; DeepSpeed keeps an fp32 master
    # copy of its partition (a clone even when the weights are fp32) and two fp32 states
    per_parameter = 12 if plan.master_weights else 2 * trained
    optimizer = (
        0
        if "optimizer" in plan.offload
        else counts.trainable * per_parameter / (split * (shard_group if plan.shard >= 1 else 1))
    )
    recompute = gradient_checkpointing or plan.activation_checkpointing
    activations = activation_bytes(
        model_config, batch_size, max_length, element, recompute, plan.mesh.get("tp", 1), loss_in_output_layer
    ) // plan.mesh.get("cp", 1)  # each rank holds its share of a row
    # the optimizer step's temporaries
    buffers = counts.trainable * trained / (split * (shard_group if plan.shard >= 1 else 1))
    if plan.strategy == "ddp" and plan.dp > 1:
        buffers += counts.trainable * trained  # DDP's gradient buckets
    if plan.shard >= 3 and shard_group > 1:
        # one layer gathered, the next prefetched
        buffers += counts.largest_layer * element * 2 / plan.mesh.get("tp", 1)
    return MemoryEstimate(int(weights), int(gradients), int(optimizer), int(activations), int(buffers))


def activation_bytes(
    model_config: Any,
    rows: int,
    length: int,
    element: int,
    recompute: bool,
    tp: int = 1,
    loss_in_output_layer: bool = False,
) -> int:
    """What the forward pass keeps for the backward: every layer's saved tensors, or with
    recomputation each layer's input plus one layer's tensors, and the logits (all of
    them, or with ``loss_in_output_layer`` one chunk and the input gradient of all rows)."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    mlp = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    tokens = rows * length
    per_layer = tokens * (HIDDEN_TENSORS * hidden + (KV_TENSORS * kv + MLP_TENSORS * mlp) / tp) * element
    kept = tokens * hidden * element * layers + per_layer if recompute else per_layer * layers
    if loss_in_output_layer:
        from modelloop.models.output_loss import CHUNK_ELEMENTS

        logits = min(tokens * model_config.vocab_size, CHUNK_ELEMENTS) * (4 + 4 + element) + tokens * hidden * element
    else:
        logits = tokens * model_config.vocab_size * 4 * LOGIT_COPIES / tp
    return int(kept + logits)


def element_bytes(dtype: str, model_config: Any) -> int:
    """Bytes per weight for the stage's ``dtype`` (``auto``: as the model was saved)."""
    if dtype == "auto":
        saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
        dtype = str(saved).removeprefix("torch.") if saved is not None else "float32"
    return DTYPE_BYTES.get(dtype, 4)


def parse_size(text: str) -> int:
    """``80GiB``, ``24GB``, ``512MiB`` or a plain number of bytes."""
    units = {
        "kib": 2**10,
        "mib": MIB,
        "gib": GIB,
        "tib": 2**40,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "b": 1,
        "": 1,
    }
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number) :]
    if unit not in units or not number:
        raise ValueError(f"{text!r} is not a size like 80GiB or 24GB")
    return int(float(number) * units[unit])


def _quantized_bits(tuner: Any, options: Mapping[str, Any]) -> int:
    loading = dict(tuner.load_options(options)) if tuner.load_options else {}
    quantization = loading.get("quantization_config")
    if quantization is None:
        return 0
    return 4 if getattr(quantization, "load_in_4bit", False) else 8


class PeakMemory:
    """The peak memory of a stage's training steps.

    On a GPU it is the allocator's peak since training began. On the CPU it is the
    process's peak resident size since training began (Linux resets the high-water mark
    on request), less what the process held before the model loaded, so that neither the
    libraries nor the one-off copies made while a strategy wraps the model count. Memory
    the C allocator keeps after a free would look like use, so it is handed back first.
    """

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.baseline = resident_bytes()

    def restart(self) -> None:
        """Start measuring now: when the trainer has wrapped the model, before the first step."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        _trim_allocator()
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM, the peak resident size
        except OSError:
            pass

    def measured(self) -> dict[str, float]:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_resident_bytes() - self.baseline
        return {"peak_memory_mib": max(peak, 0) / MIB}


def resident_bytes() -> int:
    """This process's resident size now (Linux ``/proc``; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_resident_bytes() -> int:
    """The peak resident size since the last reset (``VmHWM``), else since the start."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim_allocator() -> None:
    """Ask glibc to return freed memory to the system (nothing elsewhere)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass
