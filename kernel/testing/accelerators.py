"""Accelerators: ``apply`` returns the model computing what it computed before (faster
kernels, the same numbers), and a ``linear_cross_entropy`` gives the summed loss the
kernel's chunked one gives.

It runs on the tiny model of an installed family whose model type it supports; one
that needs CUDA on a machine without it, or lacks a library, is skipped.
"""

from __future__ import annotations

from modelloop.registry import MODELS, get_registry
from modelloop.specs import Accelerator
from modelloop.testing.kit import Broken, Check, Skip, require
from modelloop.testing.samples import batch, buildable, difference, load, logits, tiny_model
from modelloop.testing.workspace import Workspace

TOLERANCE = 1e-3


def checks(accelerator: Accelerator) -> list[Check]:
    found = [Check("accelerator", accelerator, "apply keeps what the model computes", keeps_outputs)]
    if accelerator.linear_cross_entropy is not None:
        found.append(
            Check("accelerator", accelerator, "linear_cross_entropy gives the kernel's summed loss", same_loss)
        )
    return found


def keeps_outputs(accelerator: Accelerator, workspace: Workspace) -> None:
    require(accelerator, "accelerator")
    families = [
        family
        for family in get_registry(MODELS)
        if buildable(family) and family.presets["tiny"]["model_type"] in accelerator.model_types
    ]
    if not families:
        raise Skip(
            f"no installed family with a tiny preset has one of its model types ({', '.join(accelerator.model_types)})"
        )
    loaded = load(tiny_model(workspace, families[0]), device_map="cuda" if accelerator.needs_cuda else None)
    inputs = batch(loaded.tokenizer, loaded.family)
    before = logits(loaded.model, inputs)
    model = accelerator.apply(loaded.model, loaded.family)
    if model is None:
        raise Broken("apply returned None, not the model")
    different = difference(logits(model, inputs), before)
    if different > TOLERANCE:
        raise Broken(f"apply changed what the model computes (max difference {different:.2g})")


def same_loss(accelerator: Accelerator, workspace: Workspace) -> None:
    import torch

    from modelloop.models.output_loss import chunked_linear_cross_entropy

    assert accelerator.linear_cross_entropy is not None
    require(accelerator, "accelerator")
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(12, 16, generator=generator), torch.randn(40, 16, generator=generator)
    labels = torch.randint(0, 40, (12,), generator=generator)
    device = "cuda" if accelerator.needs_cuda else "cpu"
    given = float(accelerator.linear_cross_entropy(hidden.to(device), weight.to(device), None, labels.to(device)))
    expected = float(chunked_linear_cross_entropy(hidden, weight, None, labels))
    if abs(given - expected) > TOLERANCE * max(1.0, abs(expected)):
        raise Broken(
            f"linear_cross_entropy gives {given:.5f}, the kernel's chunked one {expected:.5f} "
            "(it must return the sum over rows)"
        )
