"""SGLang as a modelloop engine: its OpenAI server in its own process (and, if need be, its own Python)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelloop.plugin import Engine, hookimpl

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against


def command(
    python: str, model: str, adapters: Mapping[str, str], options: Mapping[str, Any]
) -> tuple[list[str], dict[str, str]]:
    """modelloop's engine options as SGLang's server flags (``sglang.launch_server``)."""
    argv = [
        python, "-m", "sglang.launch_server",
        "--model-path", str(model),
        "--served-model-name", str(options["served_name"]),
        "--host", "127.0.0.1",
        "--port", str(options["port"]),
        "--tp-size", str(options["tensor_parallel_size"]),
        "--mem-fraction-static", str(options["gpu_memory_utilization"]),
        "--dtype", str(options["dtype"]),
    ]  # fmt: skip
    if options["max_model_len"]:
        argv += ["--context-length", str(options["max_model_len"])]
    if options["quantization"]:
        argv += ["--quantization", str(options["quantization"])]
    argv += ["--enable-lora", "--max-lora-rank", str(options["max_lora_rank"])]
    if adapters:
        argv += ["--lora-paths", *(f"{name}={path}" for name, path in adapters.items())]
    return [*argv, *map(str, options["extra_args"])], {}


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    from modelloop.plugin import start_server

    return start_server(
        "SGLang",
        "sglang",
        model_path,
        adapters,
        options,
        command,
        adapter_route="/load_lora_adapter",
        unload_route="/unload_lora_adapter",
    )


SGLANG = Engine(name="sglang", description="SGLang's OpenAI server in its own process (CUDA)", start=start)


@hookimpl
def register_engines(register):
    register(SGLANG)
