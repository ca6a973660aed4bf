"""The built-in engines: ``hf`` (transformers in this process, batching concurrent requests)
and ``hf-server`` (the same behind ``modelloop serve``, in a process of its own)."""

from __future__ import annotations

from collections.abc import Mapping
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


def serve_command(
    python: str, model: str, adapters: Mapping[str, str], options: Mapping[str, Any]
) -> tuple[list[str], dict[str, str]]:
    """``modelloop serve`` as a launched engine's server: it speaks the API vLLM and SGLang
    do, adapters loadable at run time from the folders of those it starts with."""
    argv = [python, "-m", "modelloop", "serve", str(model), "--port", str(options["port"])]
    argv += ["--served-name", str(options["served_name"])]
    if options.get("max_batch_size"):
        argv += ["--max-batch-size", str(options["max_batch_size"])]
    for name, path in adapters.items():
        argv += ["--adapters", f"{name}={path}"]
    return [*argv, *map(str, options.get("extra_args") or ())], {}


def start_served(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    from modelloop.inference.launch import start_server
    from modelloop.models.loading import read_config, resolve_model_source

    options = dict(options or {})
    if not options.get("max_model_len"):  # the server's limit, so that the client checks requests against it
        config = read_config(resolve_model_source(model_path).base)
        options["max_model_len"] = getattr(config, "max_position_embeddings", None)
    return start_server(
        "hf-server",
        "modelloop",
        model_path,
        adapters,
        options,
        serve_command,
        adapter_route="/v1/load_lora_adapter",
        unload_route="/v1/unload_lora_adapter",
    )


HF = Engine(
    name="hf",
    description="transformers in-process: batched, streaming, several LoRA adapters",
    start=start,
    attach=attach,
    preference=lambda: 0,  # the engine --engine auto falls back on: it runs wherever torch does
)

HF_SERVER = Engine(
    name="hf-server",
    description="the hf engine in its own process (modelloop serve over HTTP): GRPO rollouts that overlap training",
    start=start_served,
)


@hookimpl
def register_engines(register):
    register(HF)
    register(HF_SERVER)
