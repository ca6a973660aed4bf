"""LMDeploy as a modelloop engine: ``lmdeploy serve api_server`` (TurboMind or its PyTorch
back end) in its own process (and, if need be, its own Python)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from modelloop.plugin import Engine, EngineError, hookimpl
from modelloop_lmdeploy_loads import check_export

PLUGIN_API = ">=1.0,<2"  # the versions of modelloop.plugin this plugin is written against

BACKENDS = ("turbomind", "pytorch")
DTYPES = ("auto", "float16", "bfloat16")  # the only ones its --dtype takes


def command(
    python: str,
    model: str,
    adapters: Mapping[str, str],
    options: Mapping[str, Any],
    *,
    backend: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """modelloop's engine options as LMDeploy's server flags (LMDeploy 0.16, ``lmdeploy/cli/serve.py``).

    Only the PyTorch back end takes LoRA adapters (TurboMind would drop them without a word),
    so adapters choose it. Without them the choice is LMDeploy's: TurboMind where it has the
    architecture, else PyTorch. ``gpu_memory_utilization`` becomes the KV cache's share of the
    memory left after the weights, which is what LMDeploy sizes.
    """
    if options["dtype"] not in DTYPES:
        raise EngineError(f"LMDeploy engine: dtype must be one of {', '.join(DTYPES)}, got {options['dtype']!r}")
    if adapters and backend == "turbomind":
        raise EngineError(
            "LMDeploy's TurboMind back end serves no LoRA adapters: use backend=pytorch, or merge them first "
            "(modelloop export RUN --merge)"
        )
    argv = [
        python, "-m", "lmdeploy", "serve", "api_server", str(model),
        "--model-name", str(options["served_name"]),
        "--server-name", "127.0.0.1",
        "--server-port", str(options["port"]),
        "--tp", str(options["tensor_parallel_size"]),
        "--cache-max-entry-count", str(options["gpu_memory_utilization"]),
        "--dtype", str(options["dtype"]),
    ]  # fmt: skip
    backend = "pytorch" if adapters else backend
    if backend:
        argv += ["--backend", backend]
    if options["max_model_len"]:
        argv += ["--session-len", str(options["max_model_len"])]
    if options["max_batch_size"]:
        argv += ["--max-batch-size", str(options["max_batch_size"])]
    if options["quantization"]:  # a checkpoint's quantization_config already says it; this must then agree
        argv += ["--model-format", str(options["quantization"])]
    if adapters:
        argv += ["--adapters", *(f"{name}={path}" for name, path in adapters.items())]
    return [*argv, *map(str, options["extra_args"])], {}


def start(model_path: Any, *, adapters: Any = None, options: Any = None) -> Any:
    """Start the server; ``backend`` (turbomind or pytorch) is this engine's own option."""
    from modelloop.plugin import start_server

    options = dict(options or {})
    backend = options.pop("backend", None)
    if backend not in (None, *BACKENDS):
        raise EngineError(f"LMDeploy engine: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    # LMDeploy has no route that loads an adapter while serving, and its OpenAI server takes
    # text prompts only and returns no token ids.
    return start_server(
        "LMDeploy",
        "lmdeploy",
        model_path,
        adapters,
        options,
        partial(command, backend=backend),
        adapter_route=None,
        unload_route=None,
        token_prompts=False,
    )


LMDEPLOY = Engine(
    name="lmdeploy",
    description="LMDeploy's OpenAI server (TurboMind or PyTorch) in its own process (CUDA)",
    start=start,
    check_export=check_export,
)


@hookimpl
def register_engines(register):
    register(LMDEPLOY)
