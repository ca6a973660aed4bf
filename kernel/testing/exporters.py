"""Exporters: exporting the reference tiny model writes a folder, and when the exporter
says the ``hf`` engine can load it (or names no engine), plain transformers loads that
folder and computes finite logits (a quantized model only loads, on a machine without
CUDA: bitsandbytes' CPU kernels take only some shapes, and the tiny model's are not).

A missing library is a skip, and so is an export that stops with a ``ModelloopError``:
the kernel's way of saying what the user must change (llmcompressor's own environment,
a GPU), which the kit shows as the reason.
"""

from __future__ import annotations

from pathlib import Path

from modelloop.specs import Exporter
from modelloop.testing.kit import Broken, Check, Skip, raised, require
from modelloop.testing.samples import batch, logits, reference
from modelloop.testing.workspace import Workspace


def loads_in_transformers(exporter: Exporter) -> bool:
    return not exporter.engines or "hf" in exporter.engines


def checks(exporter: Exporter) -> list[Check]:
    what = "to a folder plain transformers loads" if loads_in_transformers(exporter) else "to a folder"
    return [Check("exporter", exporter, f"exports the tiny model {what}", exports)]


def exports(exporter: Exporter, workspace: Workspace) -> None:
    import math

    import torch
    from transformers import AutoTokenizer

    from modelloop.errors import ModelloopError
    from modelloop.models.loading import model_class

    require(exporter, "exporter")
    family, source = reference(workspace)
    out = workspace.folder(f"export-{exporter.name}") / "out"
    try:
        written = exporter.export(source, out)
    except ModelloopError as error:
        raise Skip(str(error)) from None
    if written is None or not Path(written).is_dir():
        raise Broken(f"export returned {written!r}, not the folder it wrote")
    if not loads_in_transformers(exporter):
        return
    try:
        model = model_class(family).from_pretrained(written)
        tokenizer = AutoTokenizer.from_pretrained(written)
    except Exception as error:  # noqa: BLE001 - whatever transformers raises on a folder it cannot read
        raise Broken(f"its output does not load in transformers: {raised(error)}") from None
    if getattr(model.config, "quantization_config", None) is not None and not torch.cuda.is_available():
        return  # loaded; its quantized kernels compute on CUDA GPUs (bitsandbytes' CPU ones take only some shapes)
    if not math.isfinite(float(logits(model, batch(tokenizer, family)).abs().max())):
        raise Broken("the exported model computes logits that are not finite")
