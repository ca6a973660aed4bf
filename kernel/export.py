"""Turning a run into a deployable model folder: merged safetensors, or quantized.

Every export writes a folder that plain transformers loads with ``from_pretrained``
(config, weights, tokenizer with the chat template the model was trained with,
generation config) plus a ``manifest.json`` recording where it came from. The folder
appears only when complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelloop.artifacts import hashed_files, is_run, read_manifest, run_id, runs_root, update_manifest
from modelloop.errors import ModelloopError

if TYPE_CHECKING:
    from modelloop.chat import ChatFormat
    from modelloop.specs import Exporter


class ExportError(ModelloopError):
    """An export that cannot be done as asked."""


def save_merged(source: str | Path, out: Path) -> None:
    """Base plus adapter folded into one set of weights (or the full weights as they are),
    saved with the tokenizer the run was trained with (its chat template included)."""
    from modelloop.models.loading import load_model, merged_model

    loaded = load_model(source)
    model = merged_model(loaded)
    model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)


def trained_chat_format(source: str | Path) -> ChatFormat:
    """The chat format a run (or model) was trained with: its tokenizer's template (else
    its family's) and the text that ends an assistant turn, which an export writes as stops."""
    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_tokenizer, read_config, resolve_family, resolve_model_source

    model = resolve_model_source(source, weights=False)
    return resolve_chat_format(load_tokenizer(model.tokenizer), resolve_family(read_config(model.base).model_type))


def check_export_options(exporter: Exporter, options: Mapping[str, Any]) -> None:
    """Refuse an option the exporter does not read: misspelt, it would do nothing."""
    if exporter.options is None:
        return
    for name in options:
        if name not in exporter.options:
            takes = ", ".join(exporter.options) or "none"
            raise ExportError(f"the {exporter.name} exporter has no option {name!r}; its options: {takes}")


def export_merged(source: str | Path, out: Path, **options: Any) -> Path:
    return write_export(out, lambda folder: save_merged(source, folder), source, "merged")


def export_bnb_nf4(source: str | Path, out: Path, **options: Any) -> Path:
    """4-bit NF4 (double quantization) through bitsandbytes, serialized as transformers does."""

    def write(folder: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        merged = folder.parent / f".{folder.name}.merged"
        try:
            save_merged(source, merged)
            compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
            model = AutoModelForCausalLM.from_pretrained(merged, quantization_config=config)
            model.save_pretrained(folder, safe_serialization=True)
            for name in merged.iterdir():
                if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(name, folder / name.name)
        finally:
            shutil.rmtree(merged, ignore_errors=True)

    return write_export(out, write, source, "bnb-nf4")


#: Run by llmcompressor's own Python: argv = merged folder, output folder, method, calibration folder.
COMPRESS = """
import sys
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
source, out, method, calibration = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
data = {}
if method == "fp8":
    from llmcompressor.modifiers.quantization import QuantizationModifier
    recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
else:
    import datasets
    rows = datasets.load_from_disk(calibration)
    data = {"dataset": rows, "max_seq_length": max(map(len, rows["input_ids"])), "num_calibration_samples": len(rows)}
    if method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier
        recipe = AWQModifier(targets=["Linear"], scheme="W4A16_ASYM", ignore=["lm_head"])
oneshot(model=model, recipe=recipe, **data)
model.save_pretrained(out, save_compressed=True)
AutoTokenizer.from_pretrained(source).save_pretrained(out)
"""

#: exporter name -> (llmcompressor method, needs calibration data)
METHODS = {"fp8": ("fp8", False), "gptq-int4": ("gptq", True), "awq-int4": ("awq", True)}


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
            "this export runs llmcompressor, which is not installed here (it pins transformers<=5.17): "
            "install it in its own environment and pass --quant-python ENV/bin/python"
        )
    return sys.executable


def calibration_rows(source: str | Path, files: list[str] | None, samples: int) -> list[list[int]]:
    """Token ids to calibrate on: the given files, else the run's own training data."""
    from modelloop.chat import resolve_chat_format
    from modelloop.data.tokenize import prepare_data
    from modelloop.models.loading import load_tokenizer, read_config, resolve_family, resolve_model_source

    if not files:
        if not is_run(source):
            raise ExportError(f"{source} is not a run folder: give calibration data with --calibration FILE")
        files = read_manifest(source).get("data", {}).get("train") or read_manifest(source)["config"]["data"]
    model = resolve_model_source(source)
    tokenizer = load_tokenizer(model.tokenizer)
    chat = resolve_chat_format(tokenizer, resolve_family(read_config(model.base).model_type))
    data = prepare_data(files, tokenizer, chat, max_length=2048, skip_bad_records=True)
    return [data.input_ids[i].tolist() for i in range(min(samples, len(data.input_ids)))]


def export_llmcompressor(
    name: str,
    source: str | Path,
    out: Path,
    *,
    python: str | None = None,
    calibration: list[str] | None = None,
    samples: int = 128,
) -> Path:
    """Quantize with llmcompressor (FP8, GPTQ or AWQ) into compressed-tensors format."""
    import os
    import subprocess

    method, calibrated = METHODS[name]
    interpreter = llmcompressor_python(python)
    rows = calibration_rows(source, calibration, samples) if calibrated else []

    def write(folder: Path) -> None:
        merged = folder.parent / f".{folder.name}.merged"
        data = folder.parent / f".{folder.name}.calibration"
        try:
            save_merged(source, merged)
            if rows:
                import datasets

                datasets.Dataset.from_list(
                    [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in rows]
                ).save_to_disk(str(data))
            completed = subprocess.run(
                [interpreter, "-c", COMPRESS, str(merged), str(folder), method, str(data)],
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
            )
            if completed.returncode != 0:
                tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
                raise ExportError(f"llmcompressor ({interpreter}) failed:\n{tail}")
        finally:
            shutil.rmtree(merged, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)

    return write_export(out, write, source, name)


def _hub_record(source: str | Path) -> dict[str, str | None] | None:
    """The hub, id and revision of a model named by a hub id (None for a folder)."""
    from modelloop.models.loading import resolve_model_source

    return resolve_model_source(source).hub


def write_export(out: Path, write: Callable[[Path], None], source: str | Path, kind: str) -> Path:
    """Build the export by ``write(folder)`` in a temporary folder next to ``out``, record
    its manifest (format ``kind``, the run it came from, file hashes), then rename it into
    place: ``out`` appears only when complete, and a failed export leaves nothing."""
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(building)
        parent = read_manifest(source) if is_run(source) else None
        update_manifest(
            building,
            id=run_id(out),
            stage="export",
            status="completed",
            format=kind,
            parent=parent.get("id") if parent else None,
            base_model=parent.get("base_model") if parent else str(source),
            base_model_hub=parent.get("base_model_hub") if parent else _hub_record(source),
            finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
            files=hashed_files(building),
        )
        umask = os.umask(0)
        os.umask(umask)
        building.chmod(0o777 & ~umask)  # mkdtemp makes it private; an export is for others to read
        if out.exists():
            out.rmdir()
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    if parent is not None and not out.resolve().is_relative_to(runs_root().resolve()):  # where the lineage finds it
        update_manifest(Path(source), exports=sorted({*parent.get("exports", []), str(out.resolve())}))
    return out


#: The quantization_config a built-in exporter writes, as much of it as engines read to tell
#: whether they load it:
#: llmcompressor saves GPTQ and AWQ (W4A16) as int4 packed in groups of 128, and FP8 as
#: floats, all in compressed-tensors format. An exporter not named here keeps the source's.
_PACKED_INT4 = {"format": "pack-quantized", "weights": {"num_bits": 4, "type": "int", "group_size": 128}}
WRITTEN_QUANTIZATION: dict[str, dict[str, Any]] = {
    "gptq-int4": {"quant_method": "compressed-tensors", "config_groups": {"group_0": _PACKED_INT4}},
    "awq-int4": {"quant_method": "compressed-tensors", "config_groups": {"group_0": _PACKED_INT4}},
    "fp8": {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"format": "float-quantized", "weights": {"num_bits": 8, "type": "float"}}},
    },
    "bnb-nf4": {"quant_method": "bitsandbytes"},
}


def written_config(source: str | Path, exporter: str) -> tuple[dict[str, Any], bool]:
    """The config.json an export of ``source`` by ``exporter`` will have, and whether its
    tokenizer carries a chat template: what an engine's ``check_export`` judges."""
    import json

    from modelloop.models.loading import load_tokenizer, locate, resolve_model_source

    model = resolve_model_source(source, weights=False)
    config = json.loads((Path(locate(model.base)) / "config.json").read_text())
    if exporter in WRITTEN_QUANTIZATION:
        config["quantization_config"] = WRITTEN_QUANTIZATION[exporter]
    return config, bool(load_tokenizer(model.tokenizer).chat_template)
