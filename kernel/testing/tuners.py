"""Tuners: ``check`` completes the options and refuses unknown ones; one optimizer step
(the tuner's parameter groups and optimizer, as a run builds them) lowers the loss on
the batch it was taken on; what ``save`` writes reloads to the same outputs; ``merge``
keeps them.

Reloading is what the kernel does with a run's model: an adapter tuner's adapter is
attached to the base loaded again (``adapters.attach``; ``use(None)`` and ``detach``
must then give the base's outputs), any other tuner's folder loads with the model
class's ``from_pretrained``. The tuner is checked on the reference tiny model
(``samples.reference``). A tuner whose libraries are missing is skipped, and so, on a
machine without CUDA, is one whose ``load_options`` quantize the base as it loads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelloop.specs import Tuner
from modelloop.testing.kit import Broken, Check, Skip, require
from modelloop.testing.samples import batch, difference, load, logits, loss, on_device, reference
from modelloop.testing.workspace import Workspace

#: The learning rate of the one step (AdamW's first step moves each weight by about this).
LR = 1e-3
#: How far fp32 logits may move through save and reload, or merge.
TOLERANCE = 1e-4
#: An option no tuner has: ``check`` must refuse it.
UNKNOWN_OPTION = "no_such_option"


def checks(tuner: Tuner) -> list[Check]:
    found = []
    if tuner.check is not None:
        found.append(
            Check("tuner", tuner, "check({}) completes its options and refuses unknown ones", completes_options)
        )
    found.append(Check("tuner", tuner, "one optimizer step lowers the loss on the same batch", step_lowers_loss))
    if tuner.adapter:
        found.append(
            Check(
                "tuner",
                tuner,
                "its saved adapter attached to the base gives the same outputs; use(None) and detach give the base's",
                adapter_reloads,
            )
        )
    else:
        found.append(
            Check("tuner", tuner, "what save writes loads with from_pretrained to the same outputs", save_reloads)
        )
    if tuner.merge is not None:
        found.append(Check("tuner", tuner, "merge keeps the outputs", merge_keeps_outputs))
    return found


def completes_options(tuner: Tuner, workspace: Workspace) -> None:
    assert tuner.check is not None
    options = tuner.check({})
    if not isinstance(options, Mapping):
        raise Broken(f"check({{}}) returned a {type(options).__name__}, not the completed options")
    if dict(tuner.check(dict(options))) != dict(options):
        raise Broken("checking its completed options again changes them")
    try:
        tuner.check({**options, UNKNOWN_OPTION: 1})
    except ValueError:
        return
    raise Broken(
        f"check accepts an unknown option {UNKNOWN_OPTION!r}; "
        "refuse it with ValueError (modelloop.plugin.complete does)"
    )


@dataclass
class Prepared:
    """A tuner's model on the reference tiny model, and what the checks compare it with."""

    model: Any
    loaded: Any
    folder: Path
    options: dict[str, Any]
    load_options: dict[str, Any]
    inputs: dict[str, Any]
    base_logits: Any


def prepared(tuner: Tuner, workspace: Workspace) -> Prepared:
    """The reference model loaded with the tuner's load options and prepared by it."""
    import torch

    require(tuner, "tuner")
    options = dict(tuner.check({})) if tuner.check is not None else {}
    load_options = dict(tuner.load_options(options)) if tuner.load_options is not None else {}
    if "quantization_config" in load_options and not torch.cuda.is_available():
        raise Skip(
            "it quantizes the base as it loads (load_options gives a quantization_config), "
            "which the kit checks on CUDA GPUs only"
        )
    if "quantization_config" in load_options:
        load_options.setdefault("device_map", {"": 0})  # quantized weights live on the GPU
    _, folder = reference(workspace)
    loaded = load(folder, **load_options)
    inputs = batch(loaded.tokenizer, loaded.family)
    base_logits = logits(loaded.model, inputs)
    model = tuner.prepare(loaded.model, options, loaded.family)
    if model is None:
        raise Broken("prepare returned None, not the model")
    return Prepared(model, loaded, folder, options, load_options, inputs, base_logits)


def trained(model: Any) -> list[tuple[str, Any]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


def step_lowers_loss(tuner: Tuner, workspace: Workspace) -> None:
    from modelloop.training import build_optimizer

    ready = prepared(tuner, workspace)
    model = ready.model
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    if tuner.trains_all_weights and frozen:
        raise Broken(f"it says it trains all weights, and prepare left {len(frozen)} frozen ({frozen[0]})")
    try:
        optimizer = build_optimizer(
            model, tuner, ready.options, ready.loaded.family, lr=LR, weight_decay=0.0, betas=(0.9, 0.999)
        )
    except ValueError as error:
        raise Broken(str(error)) from None
    before = loss(model, ready.inputs)
    model.train()
    model(**on_device(model, ready.inputs)).loss.backward()
    optimizer.step()
    after = loss(model, ready.inputs)
    if not after < before:
        raise Broken(f"one optimizer step did not lower the loss on the same batch ({before:.4f} -> {after:.4f})")


def changed(tuner: Tuner, workspace: Workspace) -> tuple[Prepared, Any]:
    """The prepared model with its trained parameters moved (seeded), so that what it
    saves differs from the base, and its logits then."""
    import torch

    ready = prepared(tuner, workspace)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, parameter in trained(ready.model):
            parameter.add_(
                torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype) * 0.02
            )
    return ready, logits(ready.model, ready.inputs)


def saved(tuner: Tuner, ready: Prepared, workspace: Workspace) -> Path:
    directory = workspace.folder(f"saved-{tuner.name}")
    if tuner.save is not None:
        tuner.save(ready.model, directory)
    else:
        ready.model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_reloads(tuner: Tuner, workspace: Workspace) -> None:
    import torch

    from modelloop.models.loading import model_class

    ready, expected = changed(tuner, workspace)
    directory = saved(tuner, ready, workspace)
    reloaded = model_class(ready.loaded.family).from_pretrained(directory, dtype=torch.float32)
    different = difference(logits(reloaded, ready.inputs), expected)
    if different > TOLERANCE:
        raise Broken(f"save/reload changed the outputs (max difference {different:.2g})")


def adapter_reloads(tuner: Tuner, workspace: Workspace) -> None:
    adapters = tuner.adapters
    if adapters is None:
        raise Broken(
            "its adapters cannot be loaded: it saves adapters (adapter=True) "
            "and gives no adapters=AdapterFormat(...) to attach them"
        )
    ready, expected = changed(tuner, workspace)
    directory = saved(tuner, ready, workspace)
    if not (directory / adapters.marker).is_file():
        raise Broken(f"save wrote no {adapters.marker} (its adapters' marker) into the adapter folder")
    model = adapters.attach(load(ready.folder, **ready.load_options).model, directory, name="default")
    if model is None:
        raise Broken("adapters.attach returned None, not the model")
    with adapters.use(model, "default"):
        different = difference(logits(model, ready.inputs), expected)
    if different > TOLERANCE:
        raise Broken(f"save/reload changed the outputs (max difference {different:.2g})")
    with adapters.use(model, None):
        different = difference(logits(model, ready.inputs), ready.base_logits)
    if different > TOLERANCE:
        raise Broken(f"adapters.use(model, None) does not compute as the base (max difference {different:.2g})")
    model = adapters.detach(model, "default")
    different = difference(logits(model, ready.inputs), ready.base_logits)
    if different > TOLERANCE:
        raise Broken(f"adapters.detach does not give the base back (max difference {different:.2g})")


def merge_keeps_outputs(tuner: Tuner, workspace: Workspace) -> None:
    assert tuner.merge is not None
    ready, expected = changed(tuner, workspace)
    merged = tuner.merge(ready.model)
    if merged is None:
        raise Broken("merge returned None, not the model")
    different = difference(logits(merged, ready.inputs), expected)
    if different > TOLERANCE:
        raise Broken(f"merge changed the outputs (max difference {different:.2g})")
