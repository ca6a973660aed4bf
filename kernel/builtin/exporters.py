"""Built-in exporters: ``merged`` (full-precision safetensors) and ``bnb-nf4`` (4-bit)."""

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
)


@hookimpl
def register_exporters(register):
    for exporter in EXPORTERS:
        register(exporter)
