"""vLLM as a modelloop engine: its OpenAI server in its own process (and, if need be, its own Python)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from modelloop.plugin import Engine, hookimpl

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against


def command(
    python: str, model: str, adapters: Mapping[str, str], options: Mapping[str, Any]
) -> tuple[list[str], dict[str, str]]:
    """modelloop's engine options as vLLM's server flags (vLLM 0.x ``vllm.entrypoints.openai.api_server``)."""
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model),
        "--served-model-name", str(options["served_name"]),
        "--host", "127.0.0.1",
        "--port", str(options["port"]),
        "--tensor-parallel-size", str(options["tensor_parallel_size"]),
        "--gpu-memory-utilization", str(options["gpu_memory_utilization"]),
        "--dtype", str(options["dtype"]),
    ]  # fmt: skip
    if options["max_model_len"]:
        argv += ["--max-model-len", str(options["max_model_len"])]
    if options["quantization"]:
        argv += ["--quantization", str(options["quantization"])]
    # LoRA is always on, so adapters can also be loaded while serving (/v1/load_lora_adapter).
    argv += ["--enable-lora", "--max-lora-rank", str(options["max_lora_rank"])]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if adapters:
        argv += ["--lora-modules", *(f"{name}={Path(path)}" for name, path in adapters.items())]
    return [*argv, *map(str, options["extra_args"])], env


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    from modelloop.plugin import start_server

    return start_server(
        "vLLM",
        "vllm",
        model_path,
        adapters,
        options,
        command,
        adapter_route="/v1/load_lora_adapter",
        unload_route="/v1/unload_lora_adapter",
    )


VLLM = Engine(name="vllm", description="vLLM's OpenAI server in its own process (CUDA)", start=start)


@hookimpl
def register_engines(register):
    register(VLLM)
