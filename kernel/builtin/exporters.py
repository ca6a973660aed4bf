"""Built-in exporters: ``merged`` (full-precision safetensors), ``bnb-nf4`` (4-bit), and
``fp8``, ``gptq-int4``, ``awq-int4`` through llmcompressor (usually run from its own
environment; GPTQ and AWQ calibrate on the run's training data by default)."""

from __future__ import annotations

from typing import Any

from modelloop.hooks import hookimpl
from modelloop.specs import Exporter


def merged(source: Any, out: Any, **options: Any) -> Any:
    from modelloop.export import export_merged

    return export_merged(source, out, **options)


def bnb_nf4(source: Any, out: Any, **options: Any) -> Any:
    from modelloop.export import export_bnb_nf4

    return export_bnb_nf4(source, out, **options)


def llmcompressor(name: str) -> Any:
    def export(source: Any, out: Any, **options: Any) -> Any:
        from modelloop.export import export_llmcompressor

        return export_llmcompressor(name, source, out, **options)

    return export


#: what export_llmcompressor reads: its Python, the calibration data and how many rows of it
LLMCOMPRESSOR_OPTIONS = ("python", "calibration", "samples")

EXPORTERS = (
    Exporter(
        name="merged",
        description="adapter folded into the base, safetensors, loadable by plain transformers",
        export=merged,
        engines=("hf", "vllm", "sglang", "lmdeploy"),
        aliases=("none",),
        options=(),
    ),
    Exporter(
        name="bnb-nf4",
        description="4-bit NF4 with double quantization (bitsandbytes)",
        export=bnb_nf4,
        engines=("hf", "vllm"),
        requires=("bitsandbytes",),
        options=(),
    ),
    Exporter(
        name="fp8",
        description="FP8 weights, dynamic activation scales (llmcompressor, data-free)",
        export=llmcompressor("fp8"),
        engines=("hf", "vllm", "sglang"),
        requires=("compressed_tensors",),
        options=LLMCOMPRESSOR_OPTIONS,
    ),
    Exporter(
        name="gptq-int4",
        description="4-bit weights by GPTQ, calibrated on the run's training data (llmcompressor)",
        export=llmcompressor("gptq-int4"),
        engines=("hf", "vllm", "sglang", "lmdeploy"),
        requires=("compressed_tensors",),
        options=LLMCOMPRESSOR_OPTIONS,
    ),
    Exporter(
        name="awq-int4",
        description="4-bit weights by AWQ, calibrated on the run's training data (llmcompressor)",
        export=llmcompressor("awq-int4"),
        engines=("hf", "vllm", "sglang", "lmdeploy"),
        requires=("compressed_tensors",),
        options=LLMCOMPRESSOR_OPTIONS,
    ),
)


@hookimpl
def register_exporters(register):
    for exporter in EXPORTERS:
        register(exporter)
