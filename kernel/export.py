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


#: Run with llmcompressor's own Python: argv = merged folder, output folder, scheme.
COMPRESS = """
import sys
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out, scheme = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""


def llmcompressor_python(python: str | None) -> str:
    """The Python that has llmcompressor: the one given, or this one if it has it.

    llmcompressor 0.14 pins transformers<=5.17 while the trainer's stack is newer, so it
    usually lives in its own environment, as vLLM and SGLang do.
    """
    import importlib.util
    import sys

    if python:
        return python
    if importlib.util.find_spec("llmcompressor") is None:
        raise ExportError(
            "FP8 export runs llmcompressor, which is not installed here (it pins transformers<=5.17): "
            "install it in its own environment and pass --quant-python ENV/bin/python"
        )
    return sys.executable


def export_fp8(source: str | Path, out: Path, *, python: str | None = None, **options: Any) -> Path:
    """FP8 weights with dynamic per-token activation scales (llmcompressor's FP8_DYNAMIC,
    data-free), saved in compressed-tensors format for vLLM and SGLang."""
    import os
    import subprocess

    interpreter = llmcompressor_python(python)

    def write(folder: Path) -> None:
        merged = folder.parent / f".{folder.name}.merged"
        try:
            _merged(source, merged)
            completed = subprocess.run(
                [interpreter, "-c", COMPRESS, str(merged), str(folder), "FP8_DYNAMIC"],
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
            )
            if completed.returncode != 0:
                tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
                raise ExportError(f"llmcompressor ({interpreter}) failed:\n{tail}")
        finally:
            shutil.rmtree(merged, ignore_errors=True)

    return _write(out, write, source, "fp8")


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
