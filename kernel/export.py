"""Turning a run into a deployable model folder: merged safetensors, or quantized.

Every export writes a folder that plain transformers loads with ``from_pretrained``
(config, weights, tokenizer with the chat template the model was trained with,
generation config) plus a ``manifest.json`` recording where it came from. The folder
appears only when complete.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelloop.artifacts import hashed_files, is_run, read_manifest, update_manifest
from modelloop.errors import ModelloopError


class ExportError(ModelloopError):
    """An export that cannot be done as asked."""


def _merged(source: str | Path, out: Path) -> None:
    """Base plus adapter folded into one set of weights (or the full weights as they are)."""
    from modelloop.models.loading import load_model

    loaded = load_model(source)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)


def export_merged(source: str | Path, out: Path, **options: Any) -> Path:
    return _write(out, lambda folder: _merged(source, folder), source, "merged")


def export_bnb_nf4(source: str | Path, out: Path, **options: Any) -> Path:
    """4-bit NF4 (double quantization) through bitsandbytes, serialized as transformers does."""

    def write(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        merged = folder.parent / f".{folder.name}.merged"
        try:
            _merged(source, merged)
            compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
            model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=config)
            model.save_pretrained(folder, safe_serialization=True)
            for name in merged.iterdir():
                if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(name, folder / name.name)
        finally:
            shutil.rmtree(merged, ignore_errors=True)

    return _write(out, write, source, "bnb-nf4")


def _write(out: Path, write: Callable[[Path], None], source: str | Path, kind: str) -> Path:
    """Build the export in a temporary folder next to ``out``, then rename it into place."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(building)
        parent = read_manifest(source) if is_run(source) else None
        update_manifest(
            building,
            id=out.name,
            stage="export",
            status="completed",
            format=kind,
            parent=parent.get("id") if parent else None,
            base_model=parent.get("base_model") if parent else str(source),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            files=hashed_files(building),
        )
        if out.exists():
            out.rmdir()
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return out
