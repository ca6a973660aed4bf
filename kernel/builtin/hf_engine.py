"""The built-in ``hf`` engine: transformers in this process, batching concurrent requests."""

from __future__ import annotations

from typing import Any

from modelloop.hooks import hookimpl
from modelloop.specs import Engine


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    from modelloop.inference.hf import HFSession

    return HFSession.load(model_path, adapters=adapters, options=options)


def attach(model: Any, tokenizer: Any, chat: Any, *, options: Any = None) -> Any:
    from modelloop.inference.hf import HFSession

    options = {"inline": True, **(options or {})}  # one caller, which waits: no worker thread
    return HFSession(model, tokenizer, chat, served_name=str(options.get("served_name", "policy")), options=options)


HF = Engine(
    name="hf",
    description="transformers in-process: batched, streaming, several LoRA adapters",
    start=start,
    attach=attach,
    preference=lambda: 0,  # the engine --engine auto falls back on: it runs wherever torch does
)


@hookimpl
def register_engines(register):
    register(HF)
