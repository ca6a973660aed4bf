"""The built-in ``hf`` engine: transformers in this process, batching concurrent requests."""

from __future__ import annotations

from typing import Any

from modelloop import hookimpl
from modelloop.specs import Engine


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    from modelloop.inference.hf import HFSession

    return HFSession(model_path, adapters=adapters, options=options)


HF = Engine(
    name="hf",
    description="transformers in-process: batched, streaming, several LoRA adapters",
    start=start,
    runtime_lora=True,
)


@hookimpl
def register_engines(register):
    register(HF)
