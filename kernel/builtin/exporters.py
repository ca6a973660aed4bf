"""Built-in exporters: ``merged`` (full-precision safetensors), ``bnb-nf4`` (4-bit) and
``fp8`` (through llmcompressor, usually run from its own environment)."""

from __future__ import annotations

from typing import Any

from modelloop import hookimpl
from modelloop.specs import Exporter


def merged(source: Any, out: Any, **options: Any) -> Any:
    from modelloop.export import export_merged

    return export_merged(source, out, **options)


def bnb_nf4(source: Any, out: Any, **options: Any) -> Any:
    from modelloop.export import export_bnb_nf4

    return export_bnb_nf4(source, out, **options)


def fp8(source: Any, out: Any, **options: Any) -> Any:
    from modelloop.export import export_fp8

    return export_fp8(source, out, **options)


EXPORTERS = (
    Exporter(
        name="merged",
        description="adapter folded into the base, safetensors, loadable by plain transformers",
        export=merged,
        engines=("hf", "vllm", "sglang"),
        aliases=("none",),
    ),
    Exporter(
        name="bnb-nf4",
        description="4-bit NF4 with double quantization (bitsandbytes)",
        export=bnb_nf4,
        engines=("hf", "vllm"),
        requires=("bitsandbytes",),
    ),
    Exporter(
        name="fp8",
        description="FP8 weights, dynamic activation scales (llmcompressor, compressed-tensors format)",
        export=fp8,
        engines=("hf", "vllm", "sglang"),
        requires=("compressed_tensors",),
    ),
)


@hookimpl
def register_exporters(register):
    for exporter in EXPORTERS:
        register(exporter)
